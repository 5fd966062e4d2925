"""Chat data: templates and response masks, packing, the example files, errors naming file:line."""

import json
import shutil

import numpy as np
import pytest

from deepseek_jax.data import SHIPPED_TOKENIZER, ByteTokenizer, HFTokenizer
from deepseek_jax.data.chat import (
    ChatDataError,
    JinjaChatTemplate,
    SimpleChatTemplate,
    load_dpo,
    load_prompts,
    load_sft,
    pack_examples,
    to_pairs,
)
from deepseek_jax.data.pipeline import DATA_DIR

# DeepSeek LLM / V2 chat's tokenizer_config.json template.
DEEPSEEK_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}"
    "{% endif %}{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ 'User: ' + message['content'] + '\\n\\n' }}{% elif message['role'] == 'assistant' %}"
    "{{ 'Assistant: ' + message['content'] + eos_token }}{% elif message['role'] == 'system' %}"
    "{{ message['content'] + '\\n\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
CONVO = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "<think>2 + 2 = 4</think><answer>4</answer>"},
    {"role": "user", "content": "And 3 - 1?"},
    {"role": "assistant", "content": "2"},
]
POST = DATA_DIR / "post"


@pytest.fixture(scope="module")
def hub_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hub")
    shutil.copy(SHIPPED_TOKENIZER, folder / "tokenizer.json")
    config = {"chat_template": DEEPSEEK_TEMPLATE, "bos_token": "<|bos|>", "eos_token": "<|eos|>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def _targets_text(template, rendered):
    return template.decode(rendered.ids[rendered.target_mask])


def test_simple_template_layout_and_mask():
    tok = ByteTokenizer()
    t = SimpleChatTemplate(tok)
    r = t.render(CONVO)
    want = (
        "Be brief.\n\nUser: What is 2 + 2?\n\nAssistant: <think>2 + 2 = 4</think><answer>4"
        "</answer>User: And 3 - 1?\n\nAssistant: 2"
    )
    assert r.ids[0] == tok.bos_id and tok.decode(r.ids) == want
    # Targets: each reply (with its leading space) and the eos that closes it, nothing else.
    assert list(r.ids[r.target_mask]).count(tok.eos_id) == 2
    assert _targets_text(t, r) == " " + CONVO[2]["content"] + " 2"
    prompt = t.render(CONVO[:2], add_generation_prompt=True)
    assert tok.decode(prompt.ids).endswith("Assistant:") and not prompt.target_mask.any()
    # The prompt a sampler sees is exactly the prefix of the training sequence.
    np.testing.assert_array_equal(r.ids[: len(prompt.ids)], prompt.ids)


def test_jinja_template_matches_transformers(hub_folder):
    from transformers import PreTrainedTokenizerFast

    ours = JinjaChatTemplate.from_folder(hub_folder)
    hf = PreTrainedTokenizerFast(
        tokenizer_file=str(hub_folder / "tokenizer.json"),
        bos_token="<|bos|>",
        eos_token="<|eos|>",
        chat_template=DEEPSEEK_TEMPLATE,
    )
    for gen, msgs in ((False, CONVO), (True, CONVO[:2])):
        text = hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
        assert ours.render_text(msgs, add_generation_prompt=gen) == text
        want = hf(text, add_special_tokens=False)["input_ids"]
        assert ours.render(msgs, add_generation_prompt=gen).ids.tolist() == want
    r = ours.render(CONVO)
    assert _targets_text(ours, r) == " " + CONVO[2]["content"] + " 2"
    # The eos after each reply is a target and is the special id, not text.
    assert list(r.ids[r.target_mask]).count(ours.eos_id) == 2


def test_jinja_and_simple_templates_agree_on_the_mask(hub_folder):
    jinja = JinjaChatTemplate.from_folder(hub_folder)
    simple = SimpleChatTemplate(HFTokenizer(SHIPPED_TOKENIZER))
    a, b = jinja.render(CONVO), simple.render(CONVO)
    assert jinja.decode(a.ids) == simple.decode(b.ids)
    assert _targets_text(jinja, a) == _targets_text(simple, b)


def test_jinja_template_errors(hub_folder, tmp_path):
    bad = JinjaChatTemplate(
        "{{ raise_exception('no system role') }}",
        HFTokenizer(SHIPPED_TOKENIZER)._tok,
        bos_token="<|bos|>",
        eos_token="<|eos|>",
        source="cfg.json",
    )
    with pytest.raises(ValueError, match="cfg.json: the chat template failed: no system role"):
        bad.render(CONVO)
    (tmp_path / "tokenizer.json").write_text((hub_folder / "tokenizer.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|eos|>"}))
    with pytest.raises(ValueError, match="has no \\(default\\) 'chat_template'"):
        JinjaChatTemplate.from_folder(tmp_path)
    with pytest.raises(ValueError, match="eos_token '<\\|end\\|>' is not in the tokenizer"):
        JinjaChatTemplate(
            DEEPSEEK_TEMPLATE, bad.tokenizer, bos_token="<|bos|>", eos_token="<|end|>"
        )


def test_pairs_mask_prompt_targets():
    t = SimpleChatTemplate(ByteTokenizer())
    r = t.render(CONVO[1:3])
    p = to_pairs(r)
    np.testing.assert_array_equal(p["labels"], r.ids[1:])
    np.testing.assert_array_equal(p["input_ids"], r.ids[:-1])
    # loss_mask[i] is on iff label i (the token after input i) was written by the assistant.
    np.testing.assert_array_equal(p["loss_mask"].astype(bool), r.target_mask[1:])
    first = int(np.argmax(p["loss_mask"]))
    assert t.decode(r.ids[: first + 1]).endswith("Assistant:")


def test_pack_examples_segments_positions():
    ex = [
        {k: np.arange(n, dtype=np.int32) + 10 for k in ("input_ids", "labels", "loss_mask")}
        for n in (5, 4, 3, 6)
    ]
    out = pack_examples(ex, seq_len=8, pad_id=0)
    # First fit in order: [5, 3] | [4] | [6].
    np.testing.assert_array_equal(out["segment_ids"][0], [1, 1, 1, 1, 1, 2, 2, 2])
    np.testing.assert_array_equal(out["positions"][0], [0, 1, 2, 3, 4, 0, 1, 2])
    np.testing.assert_array_equal(out["segment_ids"][1], [1, 1, 1, 1, 0, 0, 0, 0])
    np.testing.assert_array_equal(out["input_ids"][1], [10, 11, 12, 13, 0, 0, 0, 0])
    np.testing.assert_array_equal(out["loss_mask"][1, 4:], 0)
    assert out["input_ids"].shape == (3, 8)
    # Every token of every example is placed exactly once.
    assert (out["segment_ids"] > 0).sum() == 18
    with pytest.raises(ValueError, match="9 positions does not fit seq_len=8"):
        pack_examples([{k: np.zeros(9, np.int32) for k in ex[0]}], seq_len=8, pad_id=0)


def test_shipped_example_files_load():
    t = SimpleChatTemplate(HFTokenizer(SHIPPED_TOKENIZER))
    sft = load_sft(POST / "sft_arith.jsonl", t, seq_len=64)
    assert len(sft) == 256 and all(e["loss_mask"].any() for e in sft)
    packed = pack_examples(sft, seq_len=64, pad_id=t.pad_id)
    assert packed["loss_mask"].sum() == sum(e["loss_mask"].sum() for e in sft)
    dpo = load_dpo(POST / "dpo_arith.jsonl", t, seq_len=64)
    assert dpo["chosen_input_ids"].shape == dpo["rejected_input_ids"].shape == (256, 64)
    # Chosen and rejected share the prompt; they differ only in the response.
    first = np.argmax(dpo["chosen_loss_mask"], axis=1)
    assert (first == np.argmax(dpo["rejected_loss_mask"], axis=1)).all()
    prompts = load_prompts(POST / "grpo_arith.jsonl", t)
    assert len(prompts) == 256 and "answer" in prompts[0]
    assert t.decode(prompts[0]["prompt_ids"]).endswith("Assistant:")


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "a record must be a JSON object"),
        ('{"text": "hi"}', "missing field 'messages'"),
        ('{"messages": []}', "'messages' must be a non-empty list"),
        ('{"messages": [{"role": "bot", "content": "x"}]}', "messages\\[0\\].role='bot'"),
        ('{"messages": [{"role": "user", "content": 3}]}', "messages\\[0\\].content must be"),
        ('{"messages": [{"role": "user", "content": "only a question"}]}', "no assistant token"),
    ],
)
def test_bad_sft_records_name_file_and_line(tmp_path, line, message):
    good = json.dumps({"messages": CONVO[1:3]})
    path = tmp_path / "chat.jsonl"
    path.write_text(good + "\n\n" + line + "\n")
    with pytest.raises(ChatDataError, match=f"chat.jsonl:3: {message}"):
        load_sft(path, SimpleChatTemplate(ByteTokenizer()), seq_len=512)


def test_bad_dpo_and_prompt_records(tmp_path):
    t = SimpleChatTemplate(ByteTokenizer())
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "q", "chosen": "a"}) + "\n")
    with pytest.raises(ChatDataError, match="p.jsonl:1: missing field 'rejected'"):
        load_dpo(path, t, seq_len=64)
    path.write_text(json.dumps({"prompt": "q" * 100, "chosen": "a", "rejected": "b"}) + "\n")
    with pytest.raises(ChatDataError, match="p.jsonl:1 \\(chosen\\): 1.. tokens do not fit"):
        load_dpo(path, t, seq_len=64)
    path.write_text(json.dumps({"prompt": "q", "answer": 4}) + "\n")
    with pytest.raises(ChatDataError, match="p.jsonl:1: field 'answer' must be a str"):
        load_prompts(path, t)
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        load_prompts(tmp_path / "missing.jsonl", t)
