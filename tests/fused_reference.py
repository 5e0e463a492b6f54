"""Shared by the fused-update tests: a float64 reference optimizer written from the
textbook definitions, random bags, and a model whose two layers read one pool."""

from __future__ import annotations

import torch

import memcompile

from models import CASES, VOCAB, build

EXAMPLE = next(c for c in CASES if c.name == "example")
SMALL = dict(mem_size=256, knn=4, heads=2)


def make_batch(rows, v_dim, seed, n=6, picks=5):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, rows, (n, picks), generator=g), torch.rand(n, picks, generator=g),
            torch.randn(n, v_dim, generator=g))  # fmt: skip


def dense_gradient(rows, batches):
    """Float64 dense value gradient of bags (indices, weights, grad_out), and touched rows."""
    v_dim = batches[0][2].shape[1]
    grad, touched = torch.zeros(rows, v_dim, dtype=torch.float64), torch.zeros(rows, dtype=bool)
    for idx, w, go in batches:
        contrib = w.double()[..., None] * go.double()[:, None, :]
        grad.index_add_(0, idx.reshape(-1), contrib.reshape(-1, v_dim))
        touched[idx.reshape(-1)] = True
    return grad, touched


class Reference:
    """Row-wise Adagrad / lazy Adam in float64, written from their textbook definitions."""

    def __init__(self, values, name, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 initial_sum=0.0):  # fmt: skip
        self.w = values.detach().double().clone()
        self.name, self.lr, self.betas, self.eps, self.wd = name, lr, betas, eps, weight_decay
        self.sum = torch.full((self.w.shape[0],), initial_sum, dtype=torch.float64)
        self.m, self.v, self.t = torch.zeros_like(self.w), torch.zeros_like(self.w), 0

    def step(self, grad, touched, max_norm=None):
        if max_norm is not None:
            grad = grad * min(1.0, max_norm / (grad.norm().item() + 1e-6))
        self.t += 1
        r, g = touched, grad[touched]
        w = self.w[r] * (1 - self.lr * self.wd)
        if self.name == "rowwise_adagrad":
            self.sum[r] += g.pow(2).mean(1)
            self.w[r] = w - self.lr * g / (self.sum[r].sqrt()[:, None] + self.eps)
        else:
            (b1, b2), t = self.betas, self.t
            self.m[r] = b1 * self.m[r] + (1 - b1) * g
            self.v[r] = b2 * self.v[r] + (1 - b2) * g * g
            m_hat, v_hat = self.m[r] / (1 - b1**t), self.v[r] / (1 - b2**t)
            self.w[r] = w - self.lr * m_hat / (v_hat.sqrt() + self.eps)


def fused_step(table, idx, w, go):
    """One fused bag forward and backward; returns the weight gradient."""
    w = w.clone().requires_grad_()
    table.bag(table.values, idx, w).backward(go)
    return w.grad


def assert_close64(got, want):
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def pool_model():
    model = build(EXAMPLE)
    memcompile.transform(model, layers=[0, 2], **SMALL)  # one pool read by two layers
    return model


def token_ids(seed):
    return torch.randint(1, VOCAB, (2, 7), generator=torch.Generator().manual_seed(seed))
