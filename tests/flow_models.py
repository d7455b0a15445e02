"""Tiny model factories for flow tests (`tests.flow_models:NAME`), each with a real defect or trait."""

from __future__ import annotations

import torch
from torch import nn


def train_mode_dropout():
    """A classifier left in training mode: torch runs its dropout, TVM treats it as identity.

    The outputs really differ, so validation must fail and nothing may be published."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 10), nn.Dropout(0.5))
    return model.train(), (torch.zeros(1, 1, 28, 28),)


def linear_digits():
    """A one-layer digit classifier in eval mode: far less work per image than the bundled MNIST CNN,
    so its build is a LATEST that a retune of the CNN (same file, model replaced) is slower than."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 10))
    return model.eval(), (torch.zeros(1, 1, 28, 28),)


def heavier_digits():
    """A convolutional digit classifier taking the same input (`input`, 1x1x28x28) as linear_digits,
    with ~100x its work: the "retrained, bigger model at the same URI" whose rebuild is slower than LATEST."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 28 * 28, 10),
    )
    return model.eval(), (torch.zeros(1, 1, 28, 28),)
