"""The one greedy decode loop: scoring, the chain-of-thought harness and the resample recorder.

:func:`greedy` prefills all but the last prompt token (with ``prefill_hooks``), then feeds that
token as step 0 and every argmax token after it, one cached step at a time: through the bridge
(``model.step`` with ``decode_hooks``, so every TransformerLens hook fires with query length 1)
or, with ``row_sink``, through the lean step (``model.step_rows``, each layer's attention row
handed to the sink). When to stop is the caller's: a :data:`StopRule` sees each new token
before it is kept. Its callers:

- :func:`retrieval_heads.scoring.greedy_decode` — stops at EOS or at a token whose text holds a
  stop string, that token dropped (``"stop"``);
- :func:`retrieval_heads.cot.generate` — stops at EOS (dropped) or when the text so far holds a
  stop string (the token kept, the text cut there);
- ``retrieval_heads.ablation_hooks._Recordings`` — records every head's ``z`` over a fixed
  number of steps, never stopping.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Int
from torch import Tensor

if TYPE_CHECKING:
    from retrieval_heads.model import HookedModel, RowSink

__all__ = ["StopRule", "greedy"]

#: ``rule(token, generated) -> None`` (go on) or ``(reason, keep)``: stop, giving ``reason``,
#: with ``token`` appended to ``generated`` first when ``keep``. ``generated`` is the list of
#: tokens kept so far (``token`` not among them); a rule must not change it.
StopRule = Callable[[int, list[int]], tuple[str, bool] | None]


@torch.no_grad()
def greedy(
    model: HookedModel,
    ids: Int[Tensor, " pos"],
    budget: int,
    stop: StopRule | None = None,
    *,
    prefill_hooks: Sequence[tuple[str, Any]] = (),
    decode_hooks: Sequence[tuple[str, Any]] = (),
    before_step: Callable[[], None] | None = None,
    row_sink: RowSink | None = None,
) -> tuple[list[int], str | None]:
    """Greedily continue the prompt ``ids`` (at least 2 tokens): ``(generated ids, reason)``.

    At most ``budget`` steps. ``reason`` is what ``stop`` returned, or ``None`` when the budget
    ran out (``stop=None``: never stop early). ``before_step`` runs before every step, the
    stopping one included. With ``row_sink`` (and no ``decode_hooks``) the steps run
    ``model.step_rows`` instead of the bridge.
    """
    decode_hooks = list(decode_hooks)
    if row_sink is not None and decode_hooks:
        raise ValueError("decode hooks need the bridge: pass row_sink or decode_hooks, not both")
    state = model.prefill(ids[None, :-1], fwd_hooks=list(prefill_hooks))
    token = ids[-1:]
    generated: list[int] = []
    for _ in range(budget):
        if before_step is not None:
            before_step()
        if row_sink is not None:
            logits = model.step_rows(state, token, row_sink)
        else:
            logits = model.step(state, token, fwd_hooks=decode_hooks)
        next_token = int(logits[0].argmax())
        if stop is not None:
            verdict = stop(next_token, generated)
            if verdict is not None:
                reason, keep = verdict
                if keep:
                    generated.append(next_token)
                return generated, reason
        generated.append(next_token)
        token = torch.tensor([next_token], device=model.device)
    return generated, None
