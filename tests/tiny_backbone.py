"""A tiny registered backbone for end-to-end tests: a seeded two-layer CNN at 32x32.

``FEATCACHE_TEST_DELAY`` (seconds per batch) slows it down so that kill tests can strike
mid-extraction; ``FEATCACHE_TEST_HOLD`` (a path) holds every batch while that file exists, so
that a test decides when the extraction may go on. Both exist only in this test module.
"""

import os
import time

import torch
from torch import nn

from featcache.backbones import BackboneSpec, builder, register


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)

    def forward(self, x):
        h = torch.relu(self.conv1(x))
        h = torch.relu(self.conv2(h))  # (B, 16, 8, 8)
        return {"pooled": h.mean(dim=(2, 3)), "maxpool": h.amax(dim=(2, 3))}


FAIL_AFTER = None  # tests set it to make the next extraction crash after that many batches
_calls = 0


def _extract(model, x):
    global _calls
    if FAIL_AFTER is not None:
        _calls += 1
        if _calls > FAIL_AFTER:
            _calls = 0
            raise RuntimeError("injected failure")
    delay = float(os.environ.get("FEATCACHE_TEST_DELAY", "0"))
    if delay:
        time.sleep(delay)
    hold = os.environ.get("FEATCACHE_TEST_HOLD")
    deadline = time.monotonic() + 300
    while hold and os.path.exists(hold) and time.monotonic() < deadline:
        time.sleep(0.02)
    return model(x)


@builder("test-tiny")
def _build(spec, weights):
    global _calls
    _calls = 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = TinyNet()
    return model, _extract


TINY = register(
    BackboneSpec(
        name="test-tiny",
        family="test-tiny",
        weights_id="random-init:seed=0",
        input_size=32,
        interpolation="bilinear",
        mean=(0.5, 0.5, 0.5),
        std=(0.25, 0.25, 0.25),
        features=(("pooled", 16), ("maxpool", 16)),
        description="tests only",
    )
)
