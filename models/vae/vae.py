"""A variational autoencoder (Kingma & Welling, 2014) of the 16x16 shapes, with a step of its own.

Two inference paths: `forward` reconstructs images through the latent code's mean (what
evaluate.py compares with the inputs), and `sample` decodes latent codes drawn from the prior
(`exports` names it, so jit_trace_model.py --path sample exports it too). `losses` is the
evidence lower bound, negated: the reconstruction error of a code drawn by the
reparameterisation trick, plus the KL divergence of the code's distribution from the prior.
"""
import torch

from engine.model_base import PyNet


class VAE(PyNet):
    target_key = "images"  # a reconstruction is compared with its own input
    paired_targets = True
    loss_args = {"kl_weight": 1.0}  # 1: the ELBO; other values: a beta-VAE
    exports = {"sample": {"z": [8]}}  # other inference paths: method name -> its inputs' per-sample shapes

    def encode(self, images):
        encoder = self.model_components["encoder"]
        h = encoder["enc"](images)
        return encoder["enc_mu"](h), encoder["enc_logvar"](h)

    def sample(self, z):
        return self.model_components["decoder"]["dec"](z)

    def forward(self, images):
        mu, _ = self.encode(images)
        return self.sample(mu)

    def sample_rows(self, batch):
        images = batch["images"][:8]
        z = torch.randn(len(images), 8, generator=torch.Generator().manual_seed(0)).to(images.device)
        return {"input": images, "reconstruction": self(images), "sampled": self.sample(z)}

    def losses(self, network, batch, step):
        images = batch["images"]
        mu, logvar = self.encode(images)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)  # the reparameterisation trick
        n = len(images)
        # A Gaussian decoder of unit variance: the log-likelihood is the squared error, up to a constant.
        reconstruction = 0.5 * ((self.sample(z) - images) ** 2).sum() / n
        kl = -0.5 * (1 + logvar - mu ** 2 - logvar.exp()).sum() / n
        return {"reconstruction": reconstruction, "kl": self.loss_args["kl_weight"] * kl}
