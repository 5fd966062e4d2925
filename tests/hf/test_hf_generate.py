"""Greedy generation and its log-probs against transformers' `generate` (tiny random hub
checkpoints of tests/hf/conftest.py; lives here to share those fixtures)."""

import warnings

import numpy as np
import pytest

from deepseek_jax.hf import CheckpointWarning, load_pretrained
from deepseek_jax.inference import generate
from deepseek_jax.testing import MODEL_FP32, assert_close

NEW = 8
PROMPTS = [[5, 17, 3, 99, 12], [9, 1, 44, 2, 70, 8, 11, 60, 7, 120, 33]]  # ragged in our batch


def _hf_greedy(torch_model, prompt):
    import torch

    with torch.no_grad():
        out = torch_model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=NEW,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=0,
            eos_token_id=None,
        )
    tokens = out.sequences[0, len(prompt) :].tolist()
    logits = torch.stack(out.logits, 1)[0].float()  # [NEW, V] raw logits of each step
    logprobs = torch.log_softmax(logits, -1)[torch.arange(NEW), out.sequences[0, len(prompt) :]]
    return tokens, logprobs.numpy()


@pytest.mark.parametrize("name", ["v3", "v2_lite"])
def test_greedy_tokens_and_logprobs_match_transformers_generate(tiny_ckpts, name):
    directory, torch_model, _ = tiny_ckpts.get(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CheckpointWarning)
        model = load_pretrained(directory)
    res = generate(model, PROMPTS, max_new_tokens=NEW)
    for i, prompt in enumerate(PROMPTS):
        tokens, logprobs = _hf_greedy(torch_model, prompt)
        assert res.tokens[i] == tokens, f"{name} row {i}"
        assert_close(np.array(res.logprobs[i]), logprobs, **MODEL_FP32)
