"""The language model pipelined over the "pipeline" mesh axis by jaxpar.parallel.pipeline's executor.

`pipelined_loss_and_grads` has the contract of `jaxpar.train.step.loss_and_grads`: (mean token loss over
the global batch, gradients w.r.t. the same nnx.State tree, token count, stats); parameters may come in
any layout (the rule ("layers", "pipeline") stores the layers split over the pipeline axis, so no
device holds all of them). It cuts the Transformer into its stacked blocks, which the executor's
stages run, and its edges (embedding, final norm, output layer), and the batch into M microbatches
(rows j, j+M, ... as in step.py, so every microbatch is spread over the data axes). The data, fsdp and
tensor axes stay Auto inside the executor, so the model's own sharding constraints apply in a stage.

Embedding and output layer. Neither sits on one stage. The vocabulary is split over the pipeline
axis (as in "Balancing Pipeline Parallelism with Vocabulary Parallelism", Yeung et al. 2024): inside
the step every stage holds V/P rows of the embedding and V/P columns of the output layer.
- Embedding: in the tick where stage 0 runs F(m, chunk 0), every stage looks up the tokens of its
  vocabulary shard (others give 0) and a psum over the pipeline axis yields the embeddings. The input
  gradient of B(m, chunk 0) is psum-broadcast back and each stage scatter-adds its shard's rows.
- Output layer + loss: in the tick where the last stage runs F(m, last chunk), its output is
  psum-broadcast; every stage applies the final norm, computes logits for its vocabulary shard, and
  the model's vocab-parallel `cross_entropy` reduces the log-sum-exp and the target logit over the
  pipeline axis (pmax, psum). The gradient of the final hidden state is psum-reduced and lands in the
  last stage's gradient inbox, ready for its backward. Each stage keeps the output layer's gradient
  for its own shard.
So the vocabulary work of a microbatch costs every stage 1/P of the head instead of costing the last
stage all of it (in a lockstep pipeline a long tick on one stage is a long tick on all). (The stored
tables and their optimizer state follow the rules table, split over "tensor"; see rules.py.)

The head's backward is written out (dlogits = softmax - onehot, from the forward's log-sum-exp):
autodiff through a psum inside a shard_map with check_vma=False is off by a factor P.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, PartitionSpec as P

from jaxpar.config import ModelConfig, PipelineConfig, require
from jaxpar.models.llama import FULL_LENGTH, RESIDUAL, cross_entropy, remat_policy
from jaxpar.parallel import rules
from jaxpar.parallel.pipeline import HeadOut, lower, run_schedule
from jaxpar.train import step


def block_layer_fn(block_graphdef: nnx.GraphDef, cfg: ModelConfig):
    """One Transformer block as the executor's layer function, rematerialised as the model's scan is."""

    def layer(x_BTD, layer_params, positions_BT, segment_ids_BT):
        return nnx.merge(block_graphdef, layer_params)(x_BTD, positions_BT, segment_ids_BT)

    if cfg.remat != "none":
        layer = jax.checkpoint(layer, policy=remat_policy(cfg), prevent_cse=False)
    return layer


def _shard_ids(ids_BT, shard_size: int, axis_name: str):
    """(ids within this stage's vocabulary shard, clipped into it; whether each id falls in it)."""
    local_BT = ids_BT - jax.lax.axis_index(axis_name) * shard_size
    return jnp.clip(local_BT, 0, shard_size - 1), (local_BT >= 0) & (local_BT < shard_size)


def _embedding(cfg: ModelConfig, axis_name: str):
    """The executor's first_input and accumulate_input_grad: a lookup and a scatter-add on the stage's
    rows of the embedding table."""
    dtype = jnp.dtype(cfg.dtype)

    def first_input(edges, mb):
        table = edges["embed"]
        ids_BT, valid_BT = _shard_ids(mb["inputs"], table.shape[0], axis_name)
        rows_BTD = jnp.take(table, ids_BT, axis=0)
        rows_BTD = jnp.where(valid_BT[..., None], rows_BTD, jnp.zeros((), rows_BTD.dtype))
        return jax.lax.psum(rows_BTD, axis_name).astype(dtype)

    def accumulate_input_grad(grads, g_BTD, mb):
        ids_BT, valid_BT = _shard_ids(mb["inputs"], grads["embed"].shape[0], axis_name)
        embed = grads["embed"].at[ids_BT].add(jnp.where(valid_BT[..., None], g_BTD, 0.0))
        return dict(grads, embed=embed)

    return first_input, accumulate_input_grad


def _loss_head(cfg: ModelConfig, norm_graphdef: nnx.GraphDef, axis_name: str):
    """The executor's head: final norm, this stage's vocabulary shard of the logits, the summed
    cross-entropy over all shards, and the gradients by hand."""
    dtype = jnp.dtype(cfg.dtype)
    weight_name = "embed" if cfg.tie_embeddings else "unembed"
    spec = "btd,vd->btv" if cfg.tie_embeddings else "btd,dv->btv"

    def logits_fn(h_BTD, norm_state, weight):
        x_BTD = rules.constrain(nnx.merge(norm_graphdef, norm_state)(h_BTD), FULL_LENGTH)
        return jnp.einsum(spec, x_BTD, weight.astype(dtype), preferred_element_type=jnp.float32)

    def head(h_BTD, mb, edges) -> HeadOut:
        logits_BTV, vjp_fn = jax.vjp(logits_fn, h_BTD, edges["final_norm"], edges[weight_name])
        mask_BT = mb["segment_ids"] != 0
        loss_sum, _, lse_BT = cross_entropy(
            logits_BTV, mb["targets"], mask_BT, axis_name=axis_name, with_lse=True
        )
        targets_BT = mb["targets"] - jax.lax.axis_index(axis_name) * logits_BTV.shape[-1]
        onehot_BTV = jax.nn.one_hot(targets_BT, logits_BTV.shape[-1], dtype=jnp.float32)  # 0 off the shard
        mask_BT = mask_BT.astype(jnp.float32)
        dlogits_BTV = (jnp.exp(logits_BTV - lse_BT[..., None]) - onehot_BTV) * mask_BT[..., None]
        dh_BTD, dnorm, dweight = vjp_fn(dlogits_BTV)
        grads = {"embed": None, "final_norm": jax.tree.map(lambda x: x.astype(jnp.float32), dnorm)}
        grads[weight_name] = dweight.astype(jnp.float32)
        return HeadOut(loss_sum, jax.lax.psum(dh_BTD, axis_name).astype(dtype), grads)

    return head


def _check(cfg: ModelConfig, num_stages: int, virtual_stages: int) -> None:
    L = cfg.n_layers
    require(
        L % (num_stages * virtual_stages) == 0,
        f"model.n_layers={L} is not divisible by mesh.pipeline*pipeline.virtual_stages="
        f"{num_stages}*{virtual_stages}; see PipelineConfig.validate.",
    )
    require(
        cfg.vocab_size % num_stages == 0,
        f"model.vocab_size={cfg.vocab_size} is not divisible by mesh.pipeline={num_stages}.",
    )
    require(cfg.moe.experts == 0, "the pipeline runs dense blocks only; see PipelineConfig.validate.")


def _regroup(params, block_grads, edge_grads, denominator):
    """Gradients in the tree of `params` (each divided by the token count, in its parameter's dtype)."""

    def by_path(tree):
        flat = jax.tree_util.tree_flatten_with_path(tree)[0]
        return {jax.tree_util.keystr(path): leaf for path, leaf in flat}

    blocks, norm = by_path(block_grads), by_path(edge_grads["final_norm"])

    def pick(path, leaf):
        top, rest = path[0].key, jax.tree_util.keystr(path[1:])
        grad = {
            "blocks": lambda: blocks[rest],
            "final_norm": lambda: norm[rest],
            "embed": lambda: edge_grads["embed"],
            "unembed": lambda: edge_grads["unembed"],
        }[top]()
        return (grad / denominator).astype(leaf.dtype)

    return jax.tree_util.tree_map_with_path(pick, params)


def pipelined_loss_and_grads(
    params: nnx.State,
    graphdef: nnx.GraphDef,
    batch,
    *,
    mesh: Mesh,
    pipeline_cfg: PipelineConfig,
    grad_shardings=None,
    axis_name: str = "pipeline",
):
    """(mean token loss, grads like `params`, token count, stats) over the global batch, the layers
    pipelined over the mesh's "pipeline" axis by `pipeline_cfg.schedule`: the contract of
    `jaxpar.train.step.loss_and_grads` (stats, the MoE router's, is {} for the dense blocks the pipeline
    runs). Call inside `jax.jit` under `jax.set_mesh(mesh)`."""
    if mesh.shape[axis_name] == 1:  # nothing to pipeline (and XLA rejects a manual axis of size 1)
        return step.loss_and_grads(params, graphdef, batch, 1, grad_shardings)
    schedule = pipeline_cfg.make_schedule(mesh.shape[axis_name])
    program = lower(schedule)
    with nnx.use_eager_sharding(False):
        model = nnx.merge(graphdef, params)
    cfg: ModelConfig = model.cfg
    _check(cfg, schedule.num_stages, schedule.virtual_stages)

    block_graphdef, blocks = nnx.split(model.blocks)
    norm_graphdef, norm_state = nnx.split(model.final_norm)
    # Inside the executor every stage holds a contiguous shard of the vocabulary (rows of the table).
    edges = {"embed": model.embed[...], "final_norm": norm_state}
    edge_specs = {"embed": P(axis_name), "final_norm": P()}
    if not cfg.tie_embeddings:
        edges["unembed"], edge_specs["unembed"] = model.unembed[...], P(None, axis_name)

    mask_BT = batch["segment_ids"] != 0
    count = jnp.sum(mask_BT.astype(jnp.float32))
    micro = step.split_microbatches({key: batch[key] for key in step.BATCH_KEYS}, schedule.microbatches)

    first_input, accumulate_input_grad = _embedding(cfg, axis_name)
    loss_sum, block_grads, edge_grads = run_schedule(
        program,
        mesh=mesh,
        axis_name=axis_name,
        act_names=RESIDUAL,
        layer_fn=block_layer_fn(block_graphdef, cfg),
        layers=blocks,
        layer_inputs=(micro["positions"], micro["segment_ids"]),
        edges=edges,
        edge_specs=edge_specs,
        microbatches=micro,
        first_input=first_input,
        accumulate_input_grad=accumulate_input_grad,
        head=_loss_head(cfg, norm_graphdef, axis_name),
    )

    denominator = jnp.maximum(count, 1.0)
    grads = _regroup(params, block_grads, edge_grads, denominator)
    if grad_shardings is not None:
        grads = jax.lax.with_sharding_constraint(grads, grad_shardings)
    return loss_sum / denominator, grads, count, {}


def make_pipelined_loss_and_grads(mesh: Mesh, pipeline_cfg: PipelineConfig):
    """A drop-in for `jaxpar.train.step.loss_and_grads` (same signature and results). The pipeline's
    microbatches are its gradient accumulation, so grad_accum_steps must be 1."""

    def loss_and_grads(params, graphdef, batch, grad_accum_steps: int = 1, grad_shardings=None):
        require(
            grad_accum_steps == 1,
            f"train.grad_accum_steps={grad_accum_steps} with mesh.pipeline>1: the pipeline accumulates "
            "over pipeline.microbatches instead; set train.grad_accum_steps=1 and raise "
            "pipeline.microbatches.",
        )
        return pipelined_loss_and_grads(
            params, graphdef, batch, mesh=mesh, pipeline_cfg=pipeline_cfg, grad_shardings=grad_shardings
        )

    return loss_and_grads
