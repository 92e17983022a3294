"""A class-conditional GAN (Mirza & Osindero, 2014; a projection discriminator, Miyato & Koyama,
2018) on the 16x16 shapes, with a step of its own.

`forward` is the inference path: class labels and noise in, images of those classes out (what
evaluate.py shows and jit_trace_model.py exports). `losses` is one training step's math, for
each network in turn; the engine runs everything around it (docs/training.md, "Write your own
step"). The discriminator updates first (the config lists it first) and leaves its fakes in
`step` for the generator's update: the generator has not changed yet, so they are the fakes it
would make, with their graph.
"""
import torch
import torch.nn.functional as F

from engine.model_base import PyNet

CLASSES = ("circle", "square", "triangle")  # the label values 0, 1, 2 of the shapes data


class CondGAN(PyNet):
    target_key = "images"  # the real samples (sample metrics and pictures compare the outputs with them)
    loss_args = {"label_smoothing": 0.0}  # the real label the discriminator aims at is 1 - this

    def forward(self, labels, noise):
        g = self.model_components["generator"]
        return g["gen_body"](torch.cat((noise, g["gen_label"](labels)), 1))

    def discriminate(self, images, labels):
        """A projection discriminator's raw score: unconditional, plus how well the image's
        features agree with the class's embedding."""
        d = self.model_components["discriminator"]
        features = d["disc_body"](images)
        return d["disc_out"](features) + (features * d["disc_label"](labels)).sum(1, keepdim=True)

    def sample_rows(self, batch):
        """The sample picture (dashboard and evaluate.py): a row per class, the same noise down each
        column, so that a column shows one noise drawn as each shape."""
        noise = batch["noise"][:8]
        return {name: self(torch.full((len(noise),), label, device=noise.device), noise)
                for label, name in enumerate(CLASSES)}

    def losses(self, network, batch, step):
        labels, noise, real = batch["labels"], batch["noise"], batch["images"]
        if network == "discriminator":
            step["fake"] = fake = self(labels, noise)
            real_scores, fake_scores = self.discriminate(real, labels), self.discriminate(fake.detach(), labels)
            real_target = torch.full_like(real_scores, 1.0 - self.loss_args["label_smoothing"])
            accuracy = ((real_scores > 0).float().mean() + (fake_scores < 0).float().mean()) / 2
            return {"real": F.binary_cross_entropy_with_logits(real_scores, real_target),
                    "fake": F.binary_cross_entropy_with_logits(fake_scores, torch.zeros_like(fake_scores))}, \
                {"accuracy": accuracy}  # watched, not trained on
        fake = step.pop("fake", None)  # the discriminator's fakes, made by this very generator
        if fake is None:
            fake = self(labels, noise)
        scores = self.discriminate(fake, labels)
        return {"adversarial": F.binary_cross_entropy_with_logits(scores, torch.ones_like(scores))}
