"""Notebooks 04 (generation) and 05 (speculative decoding with the MTP module)."""

from __future__ import annotations

from .common import install_cell

CELLS_GENERATION = [
    (
        "md",
        "# Generation over the latent cache\n\nTrain a model briefly, sample from it with "
        "streaming, then compare the cache sizes of MLA (the latent `c_kv` + the shared rope "
        "key) and of a full K/V cache at V3's size, and check the 8-bit latent cache against "
        "the bf16 one.",
    ),
    install_cell(),
    (
        "code",
        "import os, tempfile, time\nimport jax, jax.numpy as jnp, numpy as np\n"
        "from IPython.display import display\nimport deepseek_jax as dj\n"
        "from deepseek_jax import report\n"
        "from deepseek_jax.inference.cli import load_run\n"
        "from deepseek_jax.train.config import load_run_config\n"
        "from deepseek_jax.train.loop import run\n"
        "run_dir = os.path.join(tempfile.mkdtemp(prefix='dj-gen-'), 'run')\n"
        "overrides = [f'train.run_dir={run_dir}', 'train.progress=false', "
        "'train.tensorboard=false',\n"
        "             'checkpoint.every=0']\n"
        "if SMALL:\n"
        "    overrides += ['model.preset=v3-tiny', 'model.num_hidden_layers=2', "
        "'model.vocab_size=2048',\n"
        "                  'data.seq_len=64', 'train.steps=20', 'train.warmup_steps=2', "
        "'train.log_every=10']\n"
        "else:\n"
        "    overrides += ['train.steps=120', 'train.warmup_steps=12', 'train.log_every=20']\n"
        "summary = run(load_run_config(None, overrides))\n"
        "model, tokenizer, step = load_run(run_dir)  # newest checkpoint, the run's tokenizer\n"
        "print('restored step', step, 'loss', round(summary['last_loss'], 3))",
    ),
    (
        "md",
        "## Streaming\n`generate_stream` yields each row's new tokens every `chunk_size` decode "
        "steps; concatenated, they are exactly what `generate` returns.",
    ),
    (
        "code",
        "prompts = ['The history of', 'def main(']\n"
        "ids = [[tokenizer.bos_id] + tokenizer.encode(p) for p in prompts]\n"
        "kw = dict(max_new_tokens=24 if SMALL else 48, temperature=0.8, top_p=0.95, seed=0)\n"
        "streamed = {i: [] for i in range(len(ids))}\n"
        "for chunk in dj.generate_stream(model, ids, chunk_size=8, **kw):\n"
        "    streamed[chunk.index] += list(chunk.tokens)\n"
        "    print(f'[row {chunk.index}] +{len(chunk.tokens)}:', "
        "repr(tokenizer.decode(chunk.tokens)))\n"
        "res = dj.generate(model, ids, **kw)\n"
        "for p, toks in zip(prompts, res.tokens):\n"
        "    print(repr(p + tokenizer.decode(toks)))\n"
        "assert [streamed[i] for i in range(len(ids))] == [list(t) for t in res.tokens]",
    ),
    (
        "md",
        "## Cache bytes per token: latent vs full K/V\nMLA caches `kv_lora_rank + "
        "qk_rope_head_dim` = 512 + 64 values per token and layer (DeepSeek-V2 Sec. 2.1); "
        "multi-head attention with the same heads would cache K (128 heads x 192) and V (128 "
        "x 128). Shapes come from `jax.eval_shape` of the cache constructor at V3's config, "
        "so nothing is allocated.",
    ),
    (
        "code",
        "from deepseek_jax.mla import init_cache\n"
        "v3 = dj.load_preset('deepseek-v3-671b')\nL = v3.num_hidden_layers\n"
        "def cache_bytes(dtype, tokens=1024):\n"
        "    shapes = jax.eval_shape(lambda: init_cache(v3, 1, tokens, dtype))  # one layer\n"
        "    return L * sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(shapes)) / tokens\n"
        "latent16, latent8 = cache_bytes(jnp.bfloat16), cache_bytes(jnp.int8)\n"
        "full16 = L * v3.num_attention_heads * (v3.qk_nope_head_dim + v3.qk_rope_head_dim + "
        "v3.v_head_dim) * 2\n"
        "print(f'bytes per token: latent bf16 {latent16:,.0f}, latent int8 {latent8:,.0f}, '\n"
        "      f'full K/V bf16 {full16:,.0f} ({full16 / latent16:.0f}x the latent)')\n"
        "assert latent16 == L * (512 + 64) * 2  # V2 Sec. 2.1: (d_c + d_h^R) l elements\n"
        "assert latent8 == L * ((512 + 64) + 2 * 4)  # 8-bit values + two fp32 scales per token\n"
        "lengths = [2**k for k in range(10, 18)]  # 1K .. 128K tokens\n"
        "plt = report.pyplot()\nfig, ax = plt.subplots(figsize=(7, 4))\n"
        "report.plot_cache_bytes(ax, lengths, {\n"
        "    'full K/V (bf16)': [full16 * n for n in lengths],\n"
        "    'MLA latent (bf16)': [latent16 * n for n in lengths],\n"
        "    'MLA latent (int8)': [latent8 * n for n in lengths]})\n"
        "ax.set_title('DeepSeek-V3 cache per sequence (61 layers)')\n"
        "display(fig); plt.close(fig)",
    ),
    (
        "md",
        "## The 8-bit latent cache's accuracy\nTeacher-forced decoding of the same tokens with "
        "a float32, a bf16 and an int8 cache (per-token scales); errors are against the "
        "float32 cache.",
    ),
    (
        "code",
        "seq = jnp.asarray([ids[0] + list(res.tokens[0])], jnp.int32)\nT = seq.shape[1]\n"
        "pos = jnp.arange(T, dtype=jnp.int32)[None]\n"
        "from flax import nnx\n"
        "decode = nnx.jit(lambda m, x, c, p: m.decode(x, c, p))\n"
        "def decode_logits(dtype):\n"
        "    caches = model.init_cache(1, T, dtype)\n"
        "    out = []\n"
        "    for t in range(T):  # one token at a time through the cache: one compiled step\n"
        "        step, caches = decode(model, seq[:, t:t+1], caches, pos[:, t:t+1])\n"
        "        out.append(step)\n"
        "    return np.asarray(jnp.concatenate(out, axis=1)[0])\n"
        "ref = decode_logits(jnp.float32)\n"
        "rows = {}\n"
        "for name, dt in [('bf16', jnp.bfloat16), ('int8', jnp.int8)]:\n"
        "    got = decode_logits(dt)\n"
        "    err = np.abs(got - ref).max() / np.abs(ref).max()\n"
        "    top1 = (got.argmax(-1) == ref.argmax(-1)).mean()\n"
        "    rows[name] = (err, top1)\n"
        "    print(f'{name}: max |logit error| / max |logit| = {err:.2e}, '\n"
        "          f'top-1 agreement {top1:.1%}')\n"
        "assert rows['int8'][0] < 0.05 and rows['int8'][1] >= 0.9\n"
        "assert rows['bf16'][0] < 0.05",
    ),
]

# ------------------------------------------------------------------------- 05 speculative

CELLS_SPECULATIVE = [
    (
        "md",
        "# MTP speculative decoding\n\nV3's multi-token-prediction modules (V3 Sec. 2.2) "
        "double as a draft model: `generate(..., draft='mtp', num_draft_tokens=k)` drafts k "
        "tokens with them, verifies them in one forward of the main model over its latent "
        "cache, and keeps the longest accepted prefix plus one token "
        "(deepseek_jax/inference/speculative.py). Greedy output is identical to plain greedy "
        "decoding; sampled output has exactly the target's distribution. This notebook checks "
        "both and measures acceptance and speed.",
    ),
    install_cell(),
    (
        "md",
        "## A model whose drafts are sometimes right\nA randomly initialised MTP module almost "
        "never guesses the main model's next token, so nothing would be accepted. As in "
        "tests/inference/test_speculative.py, the tiny V3's MTP module is made to nearly copy "
        "the main model's hidden state (a dominant identity block in `eh_proj`), so its draft "
        "is the main model's prediction one position early: right when the continuation "
        "repeats, wrong otherwise. (bench/bench_speculative.py measures a trained V3 with an "
        "MTP-only trained module; its numbers are in docs/benchmarks.md.)",
    ),
    (
        "code",
        "if SMALL:  # CI: one CPU device, unoptimised XLA code generation (compiling dominates)\n"
        "    os.environ['XLA_FLAGS'] = '--xla_backend_optimization_level=0'\n"
        "import time\nimport jax, jax.numpy as jnp, numpy as np\nfrom flax import nnx\n"
        "from IPython.display import display\nimport deepseek_jax as dj\n"
        "from deepseek_jax import report\n"
        "from deepseek_jax.inference.speculative import speculative_accept\n"
        "cfg = dj.load_preset('v3-tiny').replace(num_nextn_predict_layers=1)\n"
        "model = dj.DeepSeekModel(cfg, rngs=nnx.Rngs(1))\n"
        "model.lm_head[...] = model.lm_head[...] * 20.0  # O(1) logits: clear argmaxes\n"
        "D = cfg.hidden_size\n"
        "w = model.mtp.eh_proj[...]  # [modules, 2D, D]: [Emb(t); h] -> D\n"
        "model.mtp.eh_proj[...] = w.at[:, D:, :].add(30.0 * jnp.eye(D)[None])\n"
        "rng = np.random.default_rng(0)\n"
        "B, NEW = (4, 24) if SMALL else (8, 96)\n"
        "prompts = [list(rng.integers(0, cfg.vocab_size, int(n))) for n in "
        "rng.integers(3, 16, B)]\n"
        "print(cfg.num_hidden_layers, 'layers,', cfg.num_nextn_predict_layers, 'MTP module;', "
        "B, 'prompts,', NEW, 'new tokens each')",
    ),
    (
        "md",
        "## Greedy: the same tokens as plain decoding\nDraft depths beyond the number of MTP "
        "modules reuse the last module one position further on. Each variant is compiled "
        "once, then timed over three interleaved rounds (the fastest kept, as in "
        "bench/bench_speculative.py).",
    ),
    (
        "code",
        "KS = (2,) if SMALL else (1, 2, 3)  # k = 2 > 1 module: the module reused at depth 2\n"
        "variants = {'plain': {}} | {f'k={k}': dict(draft='mtp', num_draft_tokens=k) "
        "for k in KS}\n"
        "for kw in variants.values():\n"
        "    dj.generate(model, prompts, max_new_tokens=NEW, **kw)  # compile\n"
        "res = {}\n"
        "for _ in range(3):  # interleaved rounds, each variant keeps its fastest decode\n"
        "    for name, kw in variants.items():\n"
        "        r = dj.generate(model, prompts, max_new_tokens=NEW, **kw)\n"
        "        if name not in res or r.stats['decode_s'] < res[name].stats['decode_s']:\n"
        "            res[name] = r\n"
        "plain = res['plain']\n"
        "for name, r in res.items():\n"
        "    line = f\"{name:6s} decode {r.stats['decode_tokens_per_s']:8.1f} tok/s\"\n"
        "    if name != 'plain':\n"
        "        s = r.stats['speculative']\n"
        "        per = ' / '.join(f'{a:.2f}' for a in s['acceptance_per_position'])\n"
        '        line += (f"  acceptance per position {per}, tokens per verify step "\n'
        "                 f\"{s['mean_accepted_length']:.2f}\")\n"
        "        assert r.tokens == plain.tokens  # greedy speculative == greedy\n"
        "        assert 0 < s['accepted_tokens'] < s['drafted_tokens']  # accepts and rejects\n"
        "    print(line)\n"
        "print('every speculative output equals plain greedy decoding')",
    ),
    (
        "md",
        "Acceptance per draft position (the share of verify steps that reached position i "
        "and accepted its draft) and decode throughput relative to plain decoding. On a CPU "
        "a tiny model's verify forward costs about as much as a decode step, so the speed-up "
        "follows the tokens per verify step minus the drafting cost; measured, not asserted.",
    ),
    (
        "code",
        "plt = report.pyplot()\n"
        "fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 3.5))\n"
        "width = 0.8 / len(KS)\n"
        "for j, k in enumerate(KS):\n"
        "    acc = res[f'k={k}'].stats['speculative']['acceptance_per_position']\n"
        "    ax1.bar(np.arange(1, k + 1) + (j - (len(KS) - 1) / 2) * width, acc, width, "
        "label=f'k={k}')\n"
        "ax1.set_xlabel('draft position'); ax1.set_ylabel('acceptance'); ax1.set_ylim(0, 1)\n"
        "ax1.set_xticks(range(1, max(KS) + 1)); ax1.legend(); "
        "ax1.set_title('acceptance per draft position')\n"
        "rate0 = plain.stats['decode_tokens_per_s']\n"
        "names = list(res)\n"
        "speed = [res[n].stats['decode_tokens_per_s'] / rate0 for n in names]\n"
        "ax2.bar(names, speed, color=['gray'] + ['C0'] * len(KS))\n"
        "ax2.axhline(1.0, color='k', lw=0.8)\n"
        "ax2.set_ylabel('decode tok/s vs plain'); ax2.set_title('speed-up (greedy, batch '"
        " + str(B) + ')')\n"
        "fig.tight_layout(); display(fig); plt.close(fig)\n"
        "print({n: round(s, 2) for n, s in zip(names, speed)})",
    ),
    (
        "md",
        "## The accept / resample rule keeps the target distribution\nThe kernel alone on a "
        "6-token vocabulary: drafts d_1, d_2 ~ q_1, q_2 are accepted with probability "
        "min(1, p(d)/q(d)); at the first rejection a token is drawn from "
        "normalize(max(p - q, 0)), and after K accepts a bonus token from p_K. Whatever q is, "
        "the first emitted token must follow p_0 exactly, and the token after an accepted d_1 "
        "must follow p_1 (Leviathan et al. 2023, Theorem 1). Checked by a chi-square test and "
        "the total-variation distance over many independent steps; emitting the drafts "
        "unchecked would follow q instead (TV distance to p printed below).",
    ),
    (
        "code",
        "from scipy import stats\n"
        "V, N = 6, (50_000 if SMALL else 400_000)\n"
        "r = np.random.default_rng(1)\n"
        "p = jnp.asarray(r.dirichlet(np.ones(V) * 0.7, size=3), jnp.float32)  # p_0, p_1, p_2\n"
        "q = jnp.asarray(r.dirichlet(np.ones(V) * 0.7, size=2), jnp.float32)  # q_1, q_2\n"
        "@jax.jit\n"
        "def step(key):  # one speculative step with K = 2: the emitted tokens\n"
        "    kd, ka = jax.random.split(key)\n"
        "    d = jax.random.categorical(kd, jnp.log(q), axis=-1).astype(jnp.int32)\n"
        "    a, y = speculative_accept(p[None], q[None], d[None], ka[None])\n"
        "    return a[0], jnp.where(jnp.arange(3) < a[0], jnp.append(d, 0), y[0])\n"
        "a, emitted = jax.device_get(jax.vmap(step)(jax.random.split(jax.random.key(0), N)))\n"
        "checks = [('first token', emitted[:, 0], p[0]), "
        "('second | d_1 accepted', emitted[a >= 1, 1], p[1])]\n"
        "plt = report.pyplot()\n"
        "fig, axes = plt.subplots(1, 2, figsize=(12, 3.2))\n"
        "for ax, (name, toks, target) in zip(axes, checks):\n"
        "    counts = np.bincount(toks, minlength=V)\n"
        "    freq, target = counts / len(toks), np.asarray(target, np.float64)\n"
        "    target /= target.sum()\n"
        "    tv = 0.5 * np.abs(freq - target).sum()\n"
        "    pval = stats.chisquare(counts, target * len(toks)).pvalue\n"
        "    print(f'{name:22s} n={len(toks):7d}  TV distance {tv:.4f}  chi-square p {pval:.3f}')\n"
        "    # sqrt(V / n) is >= 2.5x the TV distance expected from sampling noise alone\n"
        "    assert pval > 1e-3 and tv < np.sqrt(V / len(toks))  # it follows the target\n"
        "    x = np.arange(V)\n"
        "    ax.bar(x - 0.2, target, 0.4, label='target p'); ax.bar(x + 0.2, freq, 0.4, "
        "label='emitted')\n"
        "    ax.set_title(name); ax.set_xlabel('token'); ax.legend()\n"
        "fig.tight_layout(); display(fig); plt.close(fig)\n"
        "tv_q = 0.5 * float(jnp.abs(p[0] - q[0]).sum())\n"
        "print(f'TV(p_0, q_1) = {tv_q:.3f}: what emitting drafts unchecked would give')\n"
        "beta = float(jnp.minimum(p[0], q[0]).sum())  # expected acceptance of d_1\n"
        "print(f'acceptance of d_1: {np.mean(a >= 1):.4f}, expected sum min(p, q) = {beta:.4f}')\n"
        "assert abs(np.mean(a >= 1) - beta) < 4 * np.sqrt(beta * (1 - beta) / N)",
    ),
]

# -------------------------------------------------------------------------- 06 post-training
