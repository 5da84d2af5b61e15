"""Teacher continuations for sequence-level KD (Kim & Rush, 2016). Pure PyTorch, no Ray."""

from __future__ import annotations

import torch


@torch.inference_mode()
def generate(model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int, strategy: str = "greedy",
             temperature: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """Extend `prompt` (B, P) by `new_tokens` tokens of the teacher's own choosing -> (B, P + new_tokens).

    Greedy takes the argmax (Kim & Rush's beam size 1); `sample` draws from softmax(z / T). The
    model is re-run on the whole prefix each step: no KV cache, which is fine for the short
    sequences of a distillation cache and works with any causal LM that maps ids to logits.
    """
    seq = prompt.long()
    for _ in range(new_tokens):
        logits = model(seq)[:, -1].float()
        if strategy == "greedy":
            nxt = logits.argmax(dim=-1, keepdim=True)
        else:
            probs = torch.softmax(logits / float(temperature), dim=-1)
            nxt = torch.multinomial(probs, 1, generator=generator)
        seq = torch.cat([seq, nxt.to(seq.device)], dim=1)
    return seq
