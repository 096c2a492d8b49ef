"""The model's optional M2P attention output (paper appendix A.5): the last dual-path
transformer block's memory-to-pixel attention, returned only when asked."""
from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from max_deeplab.gin_config import parse_config
from max_deeplab.layers.dual_path_transformer import DualPathTransformerBlock
from max_deeplab.model import OUTPUT_KEYS, build_model

SIZE = (65, 97)


def _recorded_memory_attention(monkeypatch) -> list:
    """Patches every dual-path block to record its memory queries' attention weights (in
    call order) — an observation independent of how the model returns them."""
    calls = []
    original = DualPathTransformerBlock.call

    def call(self, inputs, training=None, return_attention_weights=False):
        *outputs, weights = original(self, inputs, training=training,
                                     return_attention_weights=True)
        calls.append((self.name, weights["memory"], int(inputs[0].shape[1])))
        return (*outputs, weights) if return_attention_weights else tuple(outputs)

    monkeypatch.setattr(DualPathTransformerBlock, "call", call)
    return calls


@pytest.mark.parametrize("bindings", [[], pytest.param(
    ["DualPathTransformerBlock.use_memory_self_attention = False"], marks=pytest.mark.slow)])
def test_m2p_attention_is_the_last_blocks_and_only_when_asked(monkeypatch, bindings):
    parse_config(["tiny.gin"], bindings)
    model = build_model()
    images = tf.random.uniform([2, *SIZE, 3], 0, 255, seed=4)
    plain = model(images, training=False)
    assert set(plain) == set(OUTPUT_KEYS)  # the default call has no attention output

    calls = _recorded_memory_attention(monkeypatch)
    out = model(images, training=False, return_m2p_attention=True)
    for key in OUTPUT_KEYS:  # the other outputs are unchanged
        np.testing.assert_allclose(out[key].numpy(), plain[key].numpy(), rtol=1e-5, atol=1e-6)
    attention = out["m2p_attention"].numpy()
    # The tiny model (S-shaped): dual-path blocks at stride 16 (the backbone's last stage and
    # its extra block), 5 x 7 pixels for a 65 x 97 input; 8 heads, 16 slots.
    assert attention.shape == (2, 8, 16, 5, 7)
    name, weights, num_pixels = calls[-1]
    assert num_pixels == 35 and len(calls) >= 2
    want = weights.numpy()[..., :num_pixels].reshape(2, 8, 16, 5, 7)
    np.testing.assert_allclose(attention, want, rtol=1e-6)
    # The softmax runs over [pixels; memory]: the pixel part sums to 1 without M2M.
    per_slot = attention.sum(axis=(-2, -1))
    if bindings:
        np.testing.assert_allclose(per_slot, 1.0, rtol=1e-5)
    else:
        assert np.all(per_slot < 1.0) and np.all(per_slot > 0.0)
        assert weights.shape[-1] == num_pixels + 16
