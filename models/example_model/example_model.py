"""The toy GAN's model flow: which submodel feeds which.

The layers come from example_model_architecture.yaml; this class only wires them. `forward`
is the inference path (noise in, image out) that evaluate.py runs and jit_trace_model.py
traces; `discriminate` scores real or generated images during adversarial training.
"""
from engine.model_base import PyNet


class ExampleModel(PyNet):
    target_key = "real_images"  # the data stream holding real samples for the discriminator

    def forward(self, inputs):
        new_skip_dict = {}  # one per pass: holds the outputs that skip connections read later
        generator = self.model_components["generator"]
        gen_outputs = generator["gen_cnn"](inputs, new_skip_dict)
        return generator["gen_dec"](gen_outputs, new_skip_dict)

    def discriminate(self, images, inputs=None):
        return self.model_components["discriminator"]["disc_cnn"](images)
