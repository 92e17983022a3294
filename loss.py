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
  A discriminator that ends on a bounding layer (Sigmoid, Tanh, ...) is refused with these
  losses; a loss that takes probabilities instead says so with `fn.takes_probabilities = True`.
- loss_args: the config's `loss.loss_args`, which must be keyword-only arguments (after `*`).
- discriminator: if the function has a keyword-only argument of this name, the trainer passes
  a callable `samples -> scores` (conditional inputs already bound), for penalties that need the
  discriminator's gradient (WGAN-GP, R1). A config cannot set it.

It returns a dict of named terms; the network is trained on their sum, and each term is shown
in the progress bar and kept in the checkpoint's loss_history and metrics.jsonl.
"""
import torch
import torch.nn.functional as F


def least_squares_gan_loss(network, outputs, targets, fake_scores, real_scores, *,
                           adversarial_weight=1.0, l1_weight=0.0, l2_weight=0.0):
    """Least-squares GAN (Mao et al., 2017) plus optional weighted L1/L2 terms pulling outputs
    towards their targets (for paired data, e.g. image-to-image).

    The discriminator pushes its scores to 1 for real and 0 for generated samples by a squared
    error; unlike cross-entropy this keeps the generator's gradient alive when the discriminator
    is confident, which makes small GANs train far more reliably.
    """
    if network == "discriminator":
        return {"d_real": 0.5 * ((real_scores - 1) ** 2).mean(), "d_fake": 0.5 * (fake_scores ** 2).mean()}
    terms = {"g_adv": adversarial_weight * 0.5 * ((fake_scores - 1) ** 2).mean()}
    return terms | _reconstruction_terms(outputs, targets, l1_weight, l2_weight)


def example_gan_loss(network, outputs, targets, fake_scores, real_scores, *,
                     adversarial_weight=1.0, l1_weight=0.0, l2_weight=0.0):
    """The seed's example loss, kept under its name: least_squares_gan_loss (both examples use it)."""
    return least_squares_gan_loss(network, outputs, targets, fake_scores, real_scores,
                                  adversarial_weight=adversarial_weight, l1_weight=l1_weight, l2_weight=l2_weight)


def bce_gan_loss(network, outputs, targets, fake_scores, real_scores, *,
                 adversarial_weight=1.0, l1_weight=0.0, l2_weight=0.0, r1_weight=0.0, discriminator=None):
    """The original GAN loss in its non-saturating form: binary cross-entropy on logits. Optional
    L1/L2 terms as in least_squares_gan_loss, and the R1 penalty (Mescheder et al., 2018; StyleGAN's
    regulariser): r1_weight * mean over real samples of |grad of the score wrt the sample|^2."""
    if network == "discriminator":
        terms = {"d_real": F.binary_cross_entropy_with_logits(real_scores, torch.ones_like(real_scores)),
                 "d_fake": F.binary_cross_entropy_with_logits(fake_scores, torch.zeros_like(fake_scores))}
        if r1_weight:
            terms["r1"] = r1_weight * _r1_penalty(discriminator, targets)
        return terms
    terms = {"g_adv": adversarial_weight
                      * F.binary_cross_entropy_with_logits(fake_scores, torch.ones_like(fake_scores))}
    return terms | _reconstruction_terms(outputs, targets, l1_weight, l2_weight)


def hinge_gan_loss(network, outputs, targets, fake_scores, real_scores, *,
                   adversarial_weight=1.0, l1_weight=0.0, l2_weight=0.0):
    """Hinge loss (as in SAGAN and BigGAN): the discriminator pushes real scores above 1 and
    generated ones below -1; the generator raises the scores of its samples."""
    if network == "discriminator":
        return {"d_real": F.relu(1 - real_scores).mean(), "d_fake": F.relu(1 + fake_scores).mean()}
    terms = {"g_adv": -adversarial_weight * fake_scores.mean()}
    return terms | _reconstruction_terms(outputs, targets, l1_weight, l2_weight)


def wgan_gp_loss(network, outputs, targets, fake_scores, real_scores, *,
                 adversarial_weight=1.0, gp_weight=10.0, l1_weight=0.0, l2_weight=0.0, discriminator=None):
    """Wasserstein GAN with gradient penalty (Gulrajani et al., 2017): the critic (discriminator)
    widens the gap between its mean score on real and on generated samples, with gp_weight times
    (|grad of the score at points between real and generated samples| - 1)^2. Usually run with
    adversarial.n_disc_iterations: 5 and Adam betas [0.0, 0.9]."""
    if network == "discriminator":
        return {"d_wasserstein": fake_scores.mean() - real_scores.mean(),
                "gp": gp_weight * _gradient_penalty(discriminator, targets, outputs)}
    terms = {"g_adv": -adversarial_weight * fake_scores.mean()}
    return terms | _reconstruction_terms(outputs, targets, l1_weight, l2_weight)


def weighted_reconstruction_loss(network, outputs, targets, fake_scores=None, real_scores=None, *,
                                 l1_weight=1.0, l2_weight=0.0):
    """l1_weight * L1 + l2_weight * MSE between outputs and targets (non-adversarial training)."""
    return _reconstruction_terms(outputs, targets, l1_weight, l2_weight)


def cross_entropy_loss(network, outputs, targets, fake_scores=None, real_scores=None, *, label_smoothing=0.0):
    """Classification without a discriminator: cross-entropy between the outputs, raw class
    scores (logits, [N, C]; the softmax is applied here), and the targets, class indices (int64,
    [N]). label_smoothing in [0, 1) aims at a mix of the true class and a uniform spread."""
    return {"cross_entropy": F.cross_entropy(outputs, targets, label_smoothing=label_smoothing)}


def _reconstruction_terms(outputs, targets, l1_weight, l2_weight):
    terms = {}
    if l1_weight:
        terms["l1"] = l1_weight * F.l1_loss(outputs, targets)
    if l2_weight:
        terms["l2"] = l2_weight * F.mse_loss(outputs, targets)
    return terms


def _input_gradient(discriminator, samples):
    """d(sum of scores)/d(samples), kept in the graph so that a penalty on it can be trained."""
    samples = samples.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(discriminator(samples).sum(), samples, create_graph=True)
    return grad.flatten(1)


def _r1_penalty(discriminator, real):
    return _input_gradient(discriminator, real).pow(2).sum(1).mean()


def _gradient_penalty(discriminator, real, fake):
    """WGAN-GP's penalty at random points on the lines between real and generated samples."""
    mix = torch.rand((real.shape[0],) + (1,) * (real.dim() - 1), device=real.device, dtype=real.dtype)
    between = mix * real.detach() + (1 - mix) * fake.detach()
    return (_input_gradient(discriminator, between).norm(dim=1) - 1).pow(2).mean()
