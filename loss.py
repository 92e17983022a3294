"""Loss functions a training config names in `loss.loss_fn`. Add your own here.

The trainer calls a loss as

    loss_fn(network, outputs, targets, fake_scores, real_scores, **loss_args)

- network: "generator" or "discriminator" (which network this step trains); plain,
  non-adversarial training only ever asks for "generator".
- outputs: the generator's output for the batch; targets: the batch's target stream (real
  samples for a GAN), or None if the model flow names none.
- fake_scores / real_scores: the discriminator's raw scores (logits) for outputs / targets in
  adversarial training (real_scores only for the discriminator's update), else None. A GAN loss
  leaves them without defaults, so that using it without adversarial training is caught early.
- loss_args: the config's `loss.loss_args`, which must be keyword-only arguments (after `*`).

It returns a dict of named terms; the network is trained on their sum, and each term is shown
in the progress bar and kept in the checkpoint's loss_history.
"""
import torch
import torch.nn.functional as F


def example_gan_loss(network, outputs, targets, fake_scores, real_scores, *,
                     adversarial_weight=1.0, l1_weight=0.0, l2_weight=0.0):
    """The toy GAN's loss: least-squares GAN (Mao et al., 2017) plus optional weighted L1/L2 terms
    pulling outputs towards their targets (for paired data, e.g. image-to-image).

    The discriminator pushes its scores to 1 for real and 0 for generated samples by a squared
    error; unlike cross-entropy this keeps the generator's gradient alive when the discriminator
    is confident, which makes small GANs train far more reliably.
    """
    if network == "discriminator":
        return {"d_real": 0.5 * ((real_scores - 1) ** 2).mean(), "d_fake": 0.5 * (fake_scores ** 2).mean()}
    terms = {"g_adv": adversarial_weight * 0.5 * ((fake_scores - 1) ** 2).mean()}
    return terms | _reconstruction_terms(outputs, targets, l1_weight, l2_weight)


def bce_gan_loss(network, outputs, targets, fake_scores, real_scores, *,
                 adversarial_weight=1.0, l1_weight=0.0, l2_weight=0.0):
    """The original GAN loss in its non-saturating form: binary cross-entropy on logits.
    Optional L1/L2 terms as in example_gan_loss."""
    if network == "discriminator":
        return {"d_real": F.binary_cross_entropy_with_logits(real_scores, torch.ones_like(real_scores)),
                "d_fake": F.binary_cross_entropy_with_logits(fake_scores, torch.zeros_like(fake_scores))}
    terms = {"g_adv": adversarial_weight * F.binary_cross_entropy_with_logits(fake_scores, torch.ones_like(fake_scores))}
    return terms | _reconstruction_terms(outputs, targets, l1_weight, l2_weight)


def weighted_reconstruction_loss(network, outputs, targets, fake_scores=None, real_scores=None, *,
                                 l1_weight=1.0, l2_weight=0.0):
    """l1_weight * L1 + l2_weight * MSE between outputs and targets (non-adversarial training)."""
    return _reconstruction_terms(outputs, targets, l1_weight, l2_weight)


def _reconstruction_terms(outputs, targets, l1_weight, l2_weight):
    terms = {}
    if l1_weight:
        terms["l1"] = l1_weight * F.l1_loss(outputs, targets)
    if l2_weight:
        terms["l2"] = l2_weight * F.mse_loss(outputs, targets)
    return terms
