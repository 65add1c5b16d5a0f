"""Medusa: the tree mask against its definition and the tree forward against plain forwards of every
root-to-node path; greedy decoding equals plain greedy token for token; sampled tokens follow the target's
(filtered) distribution exactly (chi-square over 20000 rows of two rounds, as for the draft model); the
multi-draft rejection rule against its definition on fixed distributions; heads training from a base
run's checkpoint leaves every base weight bitwise unchanged while the heads' loss falls."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from infer_testing import MODELS, full_logits, greedy_reference, random_params
from scipy import stats
from test_infer_speculative import exact_pair_distribution, pair_chi_square_p_value

from jaxpar.config import ConfigError, MeshConfig, OptimizerConfig, RunConfig, TrainConfig, validate_run
from jaxpar.infer import medusa, model as model_lib
from jaxpar.infer.cache import init_cache
from jaxpar.infer.engine import Engine, Request
from jaxpar.infer.sampling import SamplingParams
from jaxpar.train import build as build_lib
from jaxpar.train.checkpoint import Checkpointer
from jaxpar.train.metrics import save_config
from lm_testing import config_mesh

HEADS = 2
SMALL = dataclasses.replace(MODELS["dense"], vocab_size=8, medusa_heads=HEADS)


def medusa_model(cfg, seed=0, head_std=1.0):
    """A random model whose heads are random too (fresh heads start as copies of the base's next-token
    prediction; random ones make the proposals differ from the target)."""
    params = random_params(cfg, seed)
    pure = nnx.to_pure_dict(params)
    key_w, key_b = jax.random.split(jax.random.key(seed + 100))
    w = pure["medusa"]["w"]
    pure["medusa"]["w"] = head_std * cfg.d_model**-0.5 * jax.random.normal(key_w, w.shape, w.dtype)
    pure["medusa"]["b"] = head_std * jax.random.normal(key_b, pure["medusa"]["b"].shape)
    nnx.replace_by_pure_dict(params, pure)
    return model_lib.from_params(cfg, params, model_lib.inference_mesh())


def test_tree_mask_is_ancestors_only():
    tree = medusa.make_tree(heads=3, width=2, candidates=11)
    assert tree.size == 12 and tree.depth == (0, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 3)
    mask = tree.ancestor_mask()
    for i in range(tree.size):
        ancestors, node = {i}, i
        while node:
            node = tree.parent[node]
            ancestors.add(node)
        assert {j for j in range(tree.size) if mask[i, j]} == ancestors, i


def test_tree_forward_equals_plain_forward_of_each_path():
    """One tree forward over a cached prefix: every node's logits equal a plain forward of prefix + its
    root-to-node path; after `compact` of one path, the cache continues like the plain sequence."""
    model = medusa_model(dataclasses.replace(MODELS["dense"], medusa_heads=3))
    tree = medusa.make_tree(heads=3, width=2, candidates=9)
    prefix = [5, 9, 3, 7, 1]
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 64, tree.size).astype(np.int32)
    net = nnx.merge(model.graphdef, model.params)
    cache = init_cache(model.cfg, 1, 32, "float32", "xla")
    row = jnp.asarray([prefix[:-1]])
    _, cache = net.forward_cached(row, jnp.arange(len(prefix) - 1)[None], jnp.ones_like(row), cache)
    tokens[0] = prefix[-1]
    length = len(prefix) - 1
    N = tree.size
    mask = jnp.broadcast_to(jnp.asarray(tree.ancestor_mask()), (model.cfg.n_layers, 1, N, N))
    positions = length + jnp.asarray(tree.depth)[None]
    logits, cache = net.forward_cached(
        jnp.asarray(tokens)[None], positions, jnp.ones((1, N), jnp.int32), cache.replace(new_mask_BTT=mask)
    )
    cache = cache.replace(new_mask_BTT=None)
    for node in range(N):
        path, walk = [], node
        while walk:
            path.insert(0, int(tokens[walk]))
            walk = tree.parent[walk]
        reference = full_logits(model, [prefix + path])[0, -1]
        np.testing.assert_allclose(np.asarray(logits[0, node]), reference, atol=2e-5, err_msg=f"node {node}")
    leaf = N - 1  # a depth-3 node: move its path into place, then decode one more token plainly
    path_nodes = [leaf]
    while tree.parent[path_nodes[0]]:
        path_nodes.insert(0, tree.parent[path_nodes[0]])
    cache = medusa.compact(cache, jnp.asarray([length]), jnp.asarray([path_nodes]), jnp.asarray([3]))
    sequence = prefix + [int(tokens[n]) for n in path_nodes] + [11]
    next_logits, _ = net.forward_cached(
        jnp.asarray([[11]]), jnp.asarray([[len(sequence) - 1]]), jnp.ones((1, 1), jnp.int32), cache
    )
    np.testing.assert_allclose(
        np.asarray(next_logits[0, 0]), full_logits(model, [sequence])[0, -1], atol=2e-5
    )


def test_greedy_equals_plain_greedy():
    """Random heads on a vocabulary of 8: the tree of 2 choices per head (5 candidates) is accepted in
    part often enough to exercise the compaction and the carried hidden state."""
    width, candidates = 2, 5
    model = medusa_model(SMALL)
    prompts = [[5, 1, 3], [7] * 12, [1, 2]]
    engine = Engine(
        model,
        slots=2,
        capacity=48,
        cache_dtype="float32",
        attention="xla",
        medusa_width=width,
        medusa_candidates=candidates,
    )
    results = engine.generate([Request(p, SamplingParams(max_tokens=13, temperature=0.0)) for p in prompts])
    for prompt, result in zip(prompts, results):
        assert result.token_ids == greedy_reference(model, prompt, 13), prompt
    per_forward = engine.decoder.tokens_per_forward()
    print(f"medusa greedy: {per_forward:.3f} tokens per target forward")
    assert per_forward > 1.2


def test_sampled_tokens_follow_the_targets_distribution():
    """Two rounds for 20000 rows (each its own seed) from one context, random heads, a tree of 2 choices
    per head: the first two emitted tokens against the exact joint of the target (t 0.9, top-p 0.95). The
    base's init_std 0.3 makes its distributions peaked, so about half the rows reject at depth 1."""
    model = medusa_model(dataclasses.replace(SMALL, init_std=0.3))
    tree = medusa.make_tree(HEADS, width=2, candidates=6)
    B, context = 20000, [3, 1, 4]
    filters = (0.9, 0, 0.95, 0.0)
    net = nnx.merge(model.graphdef, model.params)
    cache = init_cache(model.cfg, B, 16 + tree.size, "float32", "xla")
    rows = jnp.broadcast_to(jnp.asarray(context[:-1]), (B, len(context) - 1))
    positions = jnp.broadcast_to(jnp.arange(len(context) - 1), rows.shape)
    hidden, _, cache = net.hidden_states(rows, positions, jnp.ones_like(rows), cache)
    state = (cache, hidden[:, -1])
    fn = jax.jit(lambda *a: medusa._round(model.graphdef, tree, *a))
    length = np.full(B, len(context) - 1, np.int32)
    next_ = np.full(B, context[-1], np.int32)

    def sampler(counts):
        dtypes = (np.float32, np.int32, np.float32, np.float32)
        return (np.arange(B, dtype=np.uint32), counts, *(np.full(B, f, t) for f, t in zip(filters, dtypes)))

    tokens1, _, made1, state = fn(model.params, state, next_, length, sampler(np.zeros(B, np.int32)))
    tokens1, made1 = np.asarray(tokens1), np.asarray(made1)
    tokens2, *_ = fn(model.params, state, tokens1[np.arange(B), made1 - 1], length + made1, sampler(made1))
    first = tokens1[:, 0]
    second = np.where(made1 >= 2, tokens1[:, 1], np.asarray(tokens2)[:, 0])
    assert 0.2 < np.mean(made1 == 1) < 0.8 and np.mean(made1 == HEADS + 1) > 0.1  # both kinds of round
    expected = exact_pair_distribution(model, context, filters).ravel() * B
    p_value = pair_chi_square_p_value(first, second, expected)
    print(f"medusa sampling chi-square p-value {p_value:.3g}, mean tokens per round {made1.mean():.3f}")
    assert p_value > 1e-3, p_value


def test_multi_draft_rule_on_fixed_distributions():
    """One head, three i.i.d. candidates from q at the root: the emitted token is distributed as p, and a
    candidate is accepted with probability a1 + (1 - a1) a2 + (1 - a1)(1 - a2) a3, a_i = sum min(p_i, q)
    with p_1 = p and p_(i+1) the normalised residual max(0, p_i - q)."""
    B, V = 60000, 4
    tree = medusa.make_tree(heads=1, width=3, candidates=3)
    p = jnp.array([0.1, 0.2, 0.3, 0.4])
    q = jnp.array([0.4, 0.3, 0.2, 0.1])
    keys = jax.random.split(jax.random.key(0), B)
    drafts = jax.vmap(lambda key: jax.random.categorical(key, jnp.log(q), shape=(tree.size,)))(keys)
    m, _, tokens, _ = medusa.accept_tree(
        tree,
        drafts.astype(jnp.int32),
        jnp.broadcast_to(q, (B, 1, V)),
        jnp.broadcast_to(p, (B, tree.size, V)),
        jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, 7),
    )
    observed = np.bincount(np.asarray(tokens[:, 0]), minlength=V)
    assert stats.chisquare(observed, np.asarray(p) * B).pvalue > 1e-3
    accept, rest, p_i = 0.0, 1.0, np.asarray(p, np.float64)
    for _ in range(3):
        a = np.minimum(p_i, np.asarray(q)).sum()
        accept, rest = accept + rest * a, rest * (1 - a)
        p_i = np.maximum(p_i - np.asarray(q), 0) / np.maximum(p_i - np.asarray(q), 0).sum()
    assert abs(np.mean(np.asarray(m) == 1) - accept) < 0.01


def test_models_without_heads_are_refused():
    base = model_lib.from_params(MODELS["dense"], random_params(MODELS["dense"]), model_lib.inference_mesh())
    with pytest.raises(ValueError, match="no Medusa heads"):
        Engine(base, attention="xla", medusa_width=2)


def test_heads_training_keeps_the_base_bitwise(tmp_path):
    """A base checkpoint (random weights, saved as a training run saves them), then a heads run with
    train.init_from: the base restores bitwise, the heads start at zero, and after 8 steps on one batch
    every base weight is bitwise unchanged while the heads moved and their loss fell."""
    base_model = dataclasses.replace(MODELS["dense"], vocab_size=64)
    mesh_config = MeshConfig(data=1, fsdp=1, tensor=1)
    mesh = config_mesh(mesh_config, jax.devices()[:1])
    train = TrainConfig(steps=8, global_batch=8, seq_len=32)
    base_run = RunConfig(model=base_model, mesh=mesh_config, train=train)
    base_dir = str(tmp_path / "base")
    os.makedirs(base_dir)
    base_state = build_lib.build(base_run, mesh).init()
    checkpointer = Checkpointer(os.path.join(base_dir, "checkpoints"), keep=1)
    checkpointer.save(1, base_state, {})
    checkpointer.close()
    save_config(base_run, base_dir, dict(mesh.shape))
    assert json.loads(open(os.path.join(base_dir, "config.json")).read())["model"]["medusa_heads"] == 0

    run = dataclasses.replace(
        base_run,
        model=dataclasses.replace(base_model, medusa_heads=3),
        train=dataclasses.replace(train, init_from=base_dir),
        optimizer=OptimizerConfig(learning_rate=3e-2, warmup_steps=1),
    )
    program = build_lib.build(run, mesh)
    state = program.init()
    base = nnx.to_pure_dict(base_state.params)
    start = nnx.to_pure_dict(state.params)
    heads_start = {k: np.asarray(v) for k, v in start.pop("medusa").items()}
    assert all(not v.any() for v in heads_start.values())
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), base, start)

    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 64, (8, 33)).astype(np.int32)
    batch = {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "segment_ids": np.ones((8, 32), np.int32),
        "positions": np.broadcast_to(np.arange(32, dtype=np.int32), (8, 32)),
    }
    losses = []
    with jax.set_mesh(mesh):
        for _ in range(train.steps):
            state, metrics = program.train_step(state, batch)
            losses.append(float(metrics["loss"]))
    after = nnx.to_pure_dict(state.params)
    heads_after = after.pop("medusa")
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), base, after)
    assert np.asarray(heads_after["w"]).any()
    assert np.all(np.diff(losses[1:]) < 0) and losses[-1] < losses[0] - 0.15, losses  # step 1: lr 0


def test_heads_runs_name_their_base(tmp_path):
    run = RunConfig(model=dataclasses.replace(MODELS["dense"], medusa_heads=2))
    with pytest.raises(ConfigError, match="model.medusa_heads=2 trains the heads on a frozen base"):
        validate_run(run, jax.device_count())
    missing = dataclasses.replace(run, train=dataclasses.replace(run.train, init_from=str(tmp_path / "nope")))
    with pytest.raises(ConfigError, match="config.json does not exist"):
        build_lib.build(missing, config_mesh(MeshConfig(), jax.devices()[:1])).init()
