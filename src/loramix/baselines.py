"""Peer baselines run through PEFT itself, over the same expert adapters as a bundle.

Arrow (Ostapenko et al. 2024, PEFT `ArrowConfig`) is the modern gradient-free per-token router: in every
adapted layer it compares the token's hidden state with each expert's prototype (the top right-singular
vector of B A) and mixes the top-k experts. It needs no task data, unlike the centroid router.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from loramix.bundle import Bundle
from loramix.generation import GenerationResult, cut_at_stop
from loramix.models import load_base_model

ARROW_SETTINGS = {"top_k": 3, "temperature": 1.0}  # PEFT's defaults; part of every arrow result's cache key


class ArrowBaseline:
    """PEFT's Arrow router over a bundle's experts, decoded greedily with Hugging Face `generate`."""

    name = "arrow"

    def __init__(
        self, bundle: Bundle, top_k: int = ARROW_SETTINGS["top_k"], temperature: float = ARROW_SETTINGS["temperature"],
        device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
    ):  # fmt: skip
        from peft import ArrowConfig, create_arrow_model

        model, self.tokenizer = load_base_model(bundle.base_model, device=device, dtype=dtype)
        self.top_k = min(top_k, len(bundle.experts))
        self.temperature = temperature
        paths = [str(bundle.root / entry.path) for entry in bundle.experts]
        config = ArrowConfig(top_k=self.top_k, router_temperature=temperature)
        self.model = create_arrow_model(model, task_specific_adapter_paths=paths, arrow_config=config)
        self.model.eval()

    def generate(
        self,
        prompts: Sequence[str],
        max_new_tokens: int,
        stop: Sequence[str] = (),
        first_token_candidates: Sequence[int] = (),
    ) -> list[GenerationResult]:
        tokenizer = self.tokenizer
        tokenizer.padding_side = "left"
        batch = tokenizer(list(prompts), return_tensors="pt", padding=True).to(self.model.device)
        start = time.perf_counter()
        with torch.no_grad():
            out = self.model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                stop_strings=list(stop) or None,
                tokenizer=tokenizer,
                output_scores=bool(first_token_candidates),
                return_dict_in_generate=True,
                pad_token_id=tokenizer.pad_token_id,
            )
        seconds = time.perf_counter() - start
        new_tokens = out.sequences[:, batch.input_ids.shape[1] :]
        first = (
            out.scores[0].float().log_softmax(dim=-1)[:, list(first_token_candidates)]
            if first_token_candidates
            else None
        )
        results = []
        for row, prompt in enumerate(prompts):
            ids = [t for t in new_tokens[row].tolist() if t != tokenizer.pad_token_id]
            text = cut_at_stop(tokenizer.decode(ids, skip_special_tokens=True), stop)
            results.append(
                GenerationResult(
                    prompt=prompt,
                    prompt_token_ids=batch.input_ids[row][batch.attention_mask[row].bool()].tolist(),
                    text=text,
                    token_ids=ids,
                    tokens=tokenizer.convert_ids_to_tokens(ids),
                    weights=torch.zeros(len(ids), 0),  # Arrow's weights live inside each layer, per token
                    reroutes=[],
                    frozen_reroutes=0,
                    reused_embeddings=0,
                    finish_reason="length" if len(ids) >= max_new_tokens else "eos",
                    timing={"total": seconds, "tokens": float(new_tokens.numel())},
                    first_token_logprobs=first[row].tolist() if first is not None else None,
                )
            )
        return results
