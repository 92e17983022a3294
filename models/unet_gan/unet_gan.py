"""The U-Net GAN's model flow: denoising 32x32 images of shapes, pix2pix style.

The layers come from unet_gan_architecture.yaml. The generator is a U-Net whose encoder and
decoder are separate submodels: the encoder fills `skips` with the features its cat skip
connections carry, and the decoder merges them in. The discriminator is conditional: it scores
an image together with the noisy input it should have come from.
"""
import torch

from engine.model_base import PyNet


class UNetGAN(PyNet):
    target_key = "clean_images"  # the data stream the denoised output is compared with
    paired_targets = True  # clean image i is noisy image i without the noise

    def forward(self, noisy):
        skips = {}  # one per pass: the encoder's outputs that the decoder's skips read
        generator = self.model_components["generator"]
        code = generator["unet_enc"](noisy, skips)
        return generator["unet_dec"](code, skips)

    def discriminate(self, images, noisy):
        pair = torch.cat((noisy, images), 1)  # the order of patch_disc's submodel_input
        return self.model_components["discriminator"]["patch_disc"](pair)
