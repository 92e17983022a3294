"""Layers for architecture YAML files, beyond torch.nn's. Add your own here.

Any `nn.Module` subclass defined in this file can be named as a `layer_type` in an architecture,
like a class of torch.nn; nothing needs registering. A class here with the same name as a
torch.nn class replaces it in architectures (the one-tensor versions below do that).

Input sizes: if your constructor takes `in_channels`, `num_channels`, `num_features` (read off
dim 1 of the previous layer's output) or `in_features` (its last dim), leave it out of the YAML
and it is filled in (model_base.CUSTOM_INPUT_SIZE). A layer takes one tensor and returns one.

Integer inputs: a layer with float weights is refused an integer stream (input_data's dtype:
int64), which it could not compute with; an Embedding (or a subclass) reads one. A layer of your
own that reads indices says so with the class attribute `takes_indices = True`; it then also
takes one index a sample (input_size []).
"""
from torch import nn


class ResidualBlock(nn.Module):
    """conv -> ReLU -> conv, plus the input (through a 1x1 conv when the channel count changes)."""

    def __init__(self, in_channels, out_channels, kernel_size=3, padding=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size, padding=padding)
        self.act = nn.ReLU()
        self.shortcut = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x):
        return self.shortcut(x) + self.conv2(self.act(self.conv1(x)))


# ---- torch.nn layers that return a tuple, take two inputs or default to sequence-first ----
# The versions below take one batch-first tensor and return one, so they can sit in a chain of
# layers. They keep torch.nn's parameter names, so state_dicts are the same as torch.nn's. A
# sequence is [batch, time, features]; torch.nn's batch_first=False layout is not offered,
# because every tensor in an architecture has the batch first.

def _check_batch_first(batch_first):
    if batch_first is not True:
        raise ValueError("batch_first must be true: tensors in an architecture are [batch, time, features]")


class RNN(nn.RNN):
    """nn.RNN; returns the output sequence [batch, time, hidden_size * directions], not h_n."""

    def __init__(self, input_size, hidden_size, num_layers=1, nonlinearity="tanh", bias=True, batch_first=True,
                 dropout=0.0, bidirectional=False):
        _check_batch_first(batch_first)
        super().__init__(input_size, hidden_size, num_layers, nonlinearity=nonlinearity, bias=bias, batch_first=True,
                         dropout=dropout, bidirectional=bidirectional)

    def forward(self, x):
        return super().forward(x)[0]


class GRU(nn.GRU):
    """nn.GRU; returns the output sequence, not h_n."""

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=True, dropout=0.0,
                 bidirectional=False):
        _check_batch_first(batch_first)
        super().__init__(input_size, hidden_size, num_layers, bias=bias, batch_first=True, dropout=dropout,
                         bidirectional=bidirectional)

    def forward(self, x):
        return super().forward(x)[0]


class LSTM(nn.LSTM):
    """nn.LSTM; returns the output sequence, not (h_n, c_n)."""

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=True, dropout=0.0,
                 bidirectional=False, proj_size=0):
        _check_batch_first(batch_first)
        super().__init__(input_size, hidden_size, num_layers, bias=bias, batch_first=True, dropout=dropout,
                         bidirectional=bidirectional, proj_size=proj_size)

    def forward(self, x):
        return super().forward(x)[0]


class LSTMCell(nn.LSTMCell):
    """nn.LSTMCell from a zero state; returns h, not (h, c)."""

    def forward(self, x):
        return super().forward(x)[0]


class MultiheadAttention(nn.MultiheadAttention):
    """Self-attention: query, key and value are all the input [batch, time, embed_dim]; returns
    the attended sequence, without the attention weights."""

    def __init__(self, embed_dim, num_heads, dropout=0.0, bias=True, add_bias_kv=False, add_zero_attn=False,
                 batch_first=True):
        _check_batch_first(batch_first)
        super().__init__(embed_dim, num_heads, dropout=dropout, bias=bias, add_bias_kv=add_bias_kv,
                         add_zero_attn=add_zero_attn, batch_first=True)

    def forward(self, x):
        return super().forward(x, x, x, need_weights=False)[0]


class TransformerEncoderLayer(nn.TransformerEncoderLayer):
    """nn.TransformerEncoderLayer on [batch, time, d_model] (torch.nn defaults to time first)."""

    def __init__(self, d_model, nhead, dim_feedforward=2048, dropout=0.1, activation="relu", layer_norm_eps=1e-5,
                 batch_first=True, norm_first=False, bias=True):
        _check_batch_first(batch_first)
        super().__init__(d_model, nhead, dim_feedforward, dropout, activation, layer_norm_eps, batch_first=True,
                         norm_first=norm_first, bias=bias)


class Bilinear(nn.Bilinear):
    """nn.Bilinear with the input as both of its inputs: y = x^T A x + b, a quadratic layer."""

    def forward(self, x):
        return super().forward(x, x)
