"""The FLOP count behind MFU, against hand counts (jaxpar.train.costs)."""

import pytest

from configs import lm
from jaxpar.config import from_config_dict
from jaxpar.train import costs


def _model(preset):
    return from_config_dict(lm.get_config(preset)).model


def test_moe_counts_only_the_experts_a_token_uses():
    """moe_smoke (d_model 128, 2 layers, 4 query / 2 KV heads of 32, 8 experts of d_ff 128, top-2, byte
    vocabulary, T = 128), counted by hand per token:
      attention projections  128 * 32 * (2 * 4 + 2 * 2)   =  49,152 per layer
      two routed experts     2 * 3 * 128 * 128             =  98,304 per layer
      router                 128 * 8                       =   1,024 per layer
      output layer           128 * 256                     =  32,768
      matmul parameters      2 * 148,480 + 32,768          = 329,728  -> 6 N = 1,978,368
      attention scores/values 12 * 4 * 32 * (2 * 128 / 2) =   196,608
    """
    assert costs.train_flops_per_token(_model("moe_smoke"), 128) == 1_978_368 + 196_608


def test_mixtral_active_parameters_match_the_published_count():
    """Mixtral 8x7B activates 12.9B parameters per token (Mistral AI's announcement), input embedding
    (32000 x 4096) and norms included; the matmul count leaves those out."""
    cfg, T = _model("mixtral_8x7b"), 4096
    attention = 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * T / 2
    matmul_params = (costs.train_flops_per_token(cfg, T) - attention) / 6
    published = 12.9e9 - cfg.vocab_size * cfg.d_model
    assert matmul_params == pytest.approx(published, rel=0.01)


def test_dense_count_is_unchanged_by_the_moe_fields():
    """A dense model ignores the (default) MoE section: smoke's count by hand."""
    cfg = _model("smoke")  # d_model 128, 2 layers, d_ff 384
    per_layer = 128 * 32 * 12 + 3 * 128 * 384
    assert costs.train_flops_per_token(cfg, 128) == 6 * (2 * per_layer + 128 * 256) + 12 * 4 * 32 * 128
