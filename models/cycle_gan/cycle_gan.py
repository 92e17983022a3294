"""A CycleGAN (Zhu et al., 2017) between two unpaired image domains, with a step of its own.

`forward` is the inference path, A -> B (what evaluate.py shows and jit_trace_model.py exports).
`losses` is the paper's step: the two generators together (least-squares adversarial terms, the
cycle terms A -> B -> A and B -> A -> B, the identity terms), then the two discriminators, each
judging real images against fakes drawn from a history of the last POOL it was shown (the
paper's image pool; a buffer, so it is in every checkpoint and a resumed run goes on with it).
The engine runs everything around it (docs/training.md, "Write your own step").
"""
import torch
import torch.nn.functional as F

from engine.model_base import PyNet

POOL = 50  # past fakes a discriminator may be shown instead of the newest (the paper's 50)


class CycleGAN(PyNet):
    target_key = "domain_b"  # real images of the domain forward translates into
    loss_args = {"cycle_weight": 10.0, "identity_weight": 5.0}  # the paper's lambda and 0.5 lambda

    def __init__(self, path):
        super().__init__(path)
        shape = self.input_sizes["domain_a"]
        for domain in ("a", "b"):  # each discriminator's history of fakes, and how full it is
            self.register_buffer(f"pool_{domain}", torch.zeros(POOL, *shape))
            self.register_buffer(f"pooled_{domain}", torch.zeros((), dtype=torch.long))

    def net(self, component):
        return next(iter(self.model_components[component].values()))

    def forward(self, a):
        return self.net("gen_ab")(a)

    def sample_rows(self, batch):
        a = batch["domain_a"][:8]
        b = self.net("gen_ab")(a)
        return {"A": a, "A -> B": b, "A -> B -> A": self.net("gen_ba")(b)}

    def losses(self, network, batch, step):
        a, b = batch["domain_a"], batch["domain_b"]
        g_ab, g_ba, d_a, d_b = (self.net(c) for c in ("gen_ab", "gen_ba", "disc_a", "disc_b"))
        if network == "generators":
            fake_b, fake_a = g_ab(a), g_ba(b)
            step["fake_a"], step["fake_b"] = fake_a.detach(), fake_b.detach()  # for the discriminators' update
            weight = self.loss_args
            return {"adversarial_ab": least_squares(d_b(fake_b), 1.0),
                    "adversarial_ba": least_squares(d_a(fake_a), 1.0),
                    "cycle": weight["cycle_weight"] * (F.l1_loss(g_ba(fake_b), a) + F.l1_loss(g_ab(fake_a), b)),
                    "identity": weight["identity_weight"] * (F.l1_loss(g_ab(b), b) + F.l1_loss(g_ba(a), a))}
        fake_a, fake_b = step["fake_a"], step["fake_b"]
        if step.training:  # (validation judges the newest fakes, and leaves the history alone)
            fake_a, fake_b = self.from_pool("a", fake_a), self.from_pool("b", fake_b)
        return {"a": 0.5 * (least_squares(d_a(a), 1.0) + least_squares(d_a(fake_a), 0.0)),
                "b": 0.5 * (least_squares(d_b(b), 1.0) + least_squares(d_b(fake_b), 0.0))}

    @torch.no_grad()
    def from_pool(self, domain, fakes):
        """The fakes a discriminator is shown: each the newest, or, once the history is full, half
        the time one from the history, which the newest then replaces."""
        pool, pooled = getattr(self, f"pool_{domain}"), getattr(self, f"pooled_{domain}")
        shown = fakes.clone()
        for i, fake in enumerate(fakes):
            if pooled < POOL:
                pool[pooled] = fake
                pooled += 1
            elif torch.rand(()) < 0.5:
                j = int(torch.randint(POOL, ()))
                shown[i], pool[j] = pool[j].clone(), fake
        return shown


def least_squares(scores, target):
    return ((scores - target) ** 2).mean()
