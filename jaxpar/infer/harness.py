"""lm-evaluation-harness through a jaxpar model: `JaxparLM` is an lm-eval `TemplateLM`, so contexts and
continuations are tokenized exactly as lm-eval's own `hf` backend tokenizes them, and the scores come from
jaxpar's forward on the mesh (batched, rows padded to a few bucket lengths so that only a handful of programs
compile, the batch split over the mesh's batch axes).

  loglikelihood          sum of log p(continuation | context), and whether it is the greedy continuation
  loglikelihood_rolling  perplexity: the document in disjoint windows of max_length, as lm-eval's hf does
  generate_until         the inference engine (continuous batching), greedy or sampled, stopping at `until`
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from lm_eval import utils as lm_eval_utils
from lm_eval.api.model import TemplateLM
from tqdm import tqdm

from jaxpar.infer.engine import Engine, Request
from jaxpar.infer.model import LoadedModel
from jaxpar.infer.sampling import SamplingParams
from jaxpar.parallel.rules import logical_to_spec


def _bucket(length: int, smallest: int = 16) -> int:
    return max(smallest, 1 << (length - 1).bit_length())


class JaxparLM(TemplateLM):
    def __init__(
        self, model: LoadedModel, *, batch_size: int = 8, max_length: int | None = None, slots: int = 8
    ):
        super().__init__()
        if model.tokenizer is None:
            raise ValueError(
                "lm-eval needs text: this model has no tokenizer (a pre-tokenized run without one)"
            )
        self.model, self.batch_size = model, batch_size
        self.max_length = max_length or model.cfg.max_seq_len
        self._slots = slots
        self._engine: Engine | None = None

    # --- tokenization, as lm-eval's TemplateLM expects it --------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.model.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        """BOS if the tokenizer has one, else EOS: the hf backend's choice, for empty contexts and rolling
        windows."""
        bos = self.model.tokenizer.bos_id
        return self.eot_token_id if bos is None else bos

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.model.tokenizer.encode(string)

    def tok_decode(self, tokens) -> str:
        return self.model.tokenizer.decode(tokens)

    # --- scoring -------------------------------------------------------------------------------------------

    @functools.cached_property
    def _batch_sharding(self) -> jax.sharding.NamedSharding:
        return jax.sharding.NamedSharding(self.model.mesh, logical_to_spec(("batch", None)))

    @functools.cached_property
    def _score(self):
        """jit: (params, tokens_BT, targets_BT) -> (log p(target)_BT, target is the argmax_BT), reduced on
        the devices so that only [B, T] comes back, never the logits."""
        graphdef, batch = self.model.graphdef, self._batch_sharding

        def score(params, tokens_BT, targets_BT):
            B, T = tokens_BT.shape
            positions_BT = jnp.broadcast_to(jnp.arange(T), (B, T))
            logits_BTV = nnx.merge(graphdef, params)(tokens_BT, positions_BT, jnp.ones_like(tokens_BT))
            logprobs_BTV = jax.nn.log_softmax(logits_BTV.astype(jnp.float32), axis=-1)
            chosen_BT = jnp.take_along_axis(logprobs_BTV, targets_BT[..., None], axis=-1)[..., 0]
            return chosen_BT, jnp.argmax(logits_BTV, axis=-1) == targets_BT

        return jax.jit(score, in_shardings=(None, batch, batch), out_shardings=(batch, batch))

    def _loglikelihood_tokens(
        self, requests, disable_tqdm: bool = False, **kwargs
    ) -> list[tuple[float, bool]]:
        """(sum log p, greedy) per (key, context_enc, continuation_enc): the row is context + continuation,
        left-truncated to max_length + 1 tokens, fed without its last token."""
        rows = []
        for _, context, continuation in requests:
            whole = (context + continuation)[-(self.max_length + 1) :]
            rows.append((whole[:-1], whole[1:], len(continuation)))
        axes = self._batch_sharding.spec[0] or ()
        ways = int(np.prod([self.model.mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes)]))
        batch = -(-self.batch_size // ways) * ways  # rows divide over the batch axes
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))  # similar lengths share a bucket
        results: list[tuple[float, bool] | None] = [None] * len(rows)
        with jax.set_mesh(self.model.mesh):
            for start in tqdm(range(0, len(order), batch), disable=disable_tqdm, desc="loglikelihood"):
                chunk = order[start : start + batch]
                length = _bucket(max(len(rows[i][0]) for i in chunk))
                tokens = np.zeros((batch, length), np.int32)
                targets = np.zeros((batch, length), np.int32)
                for row, i in enumerate(chunk):
                    inputs, outputs, _ = rows[i]
                    tokens[row, : len(inputs)], targets[row, : len(outputs)] = inputs, outputs
                logprobs, greedy = jax.device_get(self._score(self.model.params, tokens, targets))
                for row, i in enumerate(chunk):
                    end, count = len(rows[i][0]), rows[i][2]
                    span = slice(end - count, end)
                    results[i] = (
                        float(np.sum(logprobs[row, span], dtype=np.float64)),
                        bool(np.all(greedy[row, span])),
                    )
                    if self.cache_hook is not None:
                        self.cache_hook.add_partial("loglikelihood", requests[i][0], results[i])
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for index, (string,) in enumerate(req.args for req in requests):
            for context, continuation in map(
                lm_eval_utils.make_disjoint_window,
                lm_eval_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                ),
            ):
                windows.append(((None,), context, continuation))
                owner.append(index)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for index, (logprob, _) in zip(owner, scores):
            totals[index] += logprob
        return totals

    # --- generation ----------------------------------------------------------------------------------------

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        if self._engine is None:
            self._engine = Engine(self.model, slots=self._slots, capacity=self.max_length)
        batch = []
        for context, gen_kwargs in (req.args for req in requests):
            kwargs = dict(gen_kwargs)
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            sample = kwargs.get("do_sample", False) and kwargs.get("temperature", 1.0) > 0
            max_tokens = int(kwargs.get("max_gen_toks", 256))
            prompt = self.tok_encode(context)[-(self.max_length - max_tokens) :]
            params = SamplingParams(
                max_tokens=max_tokens,
                temperature=float(kwargs.get("temperature", 1.0)) if sample else 0.0,
                top_p=float(kwargs.get("top_p", 1.0) or 1.0) if sample else 1.0,
                stop=tuple(until),
            )
            batch.append(Request(prompt, params))
        results = self._engine.generate(batch)
        return [result.text for result in results]


def evaluate(
    model: LoadedModel,
    tasks: list[str],
    *,
    include_path: str | None = None,
    num_fewshot: int | None = None,
    limit: int | float | None = None,
    batch_size: int = 8,
    log_samples: bool = False,
    bootstrap_iters: int = 1000,
) -> dict:
    """lm-eval's `simple_evaluate` on `tasks` (names of its registry, or of YAML tasks under include_path)
    with `model`; lm-eval's results dict (per task metrics, configs, and samples when log_samples)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=include_path) if include_path else TaskManager()
    return lm_eval.simple_evaluate(
        model=JaxparLM(model, batch_size=batch_size),
        tasks=tasks,
        num_fewshot=num_fewshot,
        limit=limit,
        task_manager=manager,
        log_samples=log_samples,
        bootstrap_iters=bootstrap_iters,
    )
