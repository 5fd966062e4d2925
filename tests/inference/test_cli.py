"""`python -m deepseek_jax.generate` on a training run folder, and chat-template rendering."""

import numpy as np

from deepseek_jax.inference import generate
from deepseek_jax.inference.cli import load_run, main
from deepseek_jax.inference.text import render_chat

OVERRIDES = [
    "model.preset=v3-tiny",
    "model.num_hidden_layers=1",  # one MoE layer (no dense one) under the MTP module
    "model.first_k_dense_replace=0",
    "model.vocab_size=264",
    "model.remat=none",
    "data.tokenizer=null",  # UTF-8 bytes
    "data.seq_len=32",
    "data.global_batch_size=8",
    "mesh.rules=dp",
    "train.steps=2",
    "train.log_every=1",
    "train.progress=false",
    "train.data_layout=global",
]


def test_cli_samples_from_a_training_run_folder(tmp_path, capsys):
    from deepseek_jax.train.config import load_run_config
    from deepseek_jax.train.loop import run

    run_dir = tmp_path / "run"
    run(load_run_config(None, OVERRIDES + [f"train.run_dir={run_dir}"]))
    model, tokenizer, step = load_run(run_dir)
    assert step == 2
    prompt = "Once upon"
    want = generate(model, [tokenizer.encode(prompt)], max_new_tokens=6)
    capsys.readouterr()
    assert main(["--checkpoint", str(run_dir), "--prompt", prompt, "--max-new-tokens", "6"]) == 0
    out = capsys.readouterr()
    assert out.out == prompt + tokenizer.decode(want.tokens[0]) + "\n"
    assert "compilations" in out.err
    # Streaming prints the same text.
    main(["--checkpoint", str(run_dir), "--prompt", prompt, "--max-new-tokens", "6", "--stream"])
    assert capsys.readouterr().out == tokenizer.decode(want.tokens[0]) + "\n"
    assert np.all(np.isfinite(want.logprobs[0]))
    # MTP speculative decoding: the same greedy text, and the acceptance figures.
    main(["--checkpoint", str(run_dir), "--prompt", prompt, "--max-new-tokens", "6"]
         + ["--draft", "mtp", "--num-draft-tokens", "2"])  # fmt: skip
    out = capsys.readouterr()
    assert out.out == prompt + tokenizer.decode(want.tokens[0]) + "\n"
    assert "draft mtp k=2: acceptance per position" in out.err


# DeepSeek-V2-Chat's template (hub tokenizer_config.json), abridged to its message loop.
TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}"
    "{% endif %}{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ 'User: ' + message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ 'Assistant: ' + message['content'] + eos_token }}"
    "{% elif message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def test_chat_template_renders_like_the_hub_template():
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    text = render_chat(TEMPLATE, msgs, bos_token="<bos>", eos_token="<eos>")
    assert text == "<bos>Be brief.\n\nUser: Hi\n\nAssistant:"
    text = render_chat(TEMPLATE, msgs, add_generation_prompt=False, bos_token="<b>", eos_token="")
    assert text == "<b>Be brief.\n\nUser: Hi\n\n"
