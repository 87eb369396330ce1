#!/usr/bin/env python3
"""The C++ Jinja renderer (data/jinja.h, data/chat_format.h) against transformers on real models' chat templates.

For each template in tests/fixtures/chat_templates/ (DeepSeek-LLM chat, DeepSeek-V2-Lite-Chat, DeepSeek-V3,
Llama 3 and 3.3 Instruct, Qwen2 and Qwen2.5 Instruct, GLM-4 chat), a model directory is made with a small
byte-level BPE tokenizer.json (trained here on fortunes, the template's special markers added as special tokens)
and a tokenizer_config.json carrying the template and the model's bos/eos tokens. Then, for several
conversations (system or not, multi-turn, with and without the generation prompt, quotes, newlines, non-ASCII):
  - `dsopen-tokenizer chat` renders exactly the text transformers' render_jinja_template gives;
  - its prompt ids equal AutoTokenizer.apply_chat_template(tokenize=True) on the same directory;
  - a conversation the template refuses (raise_exception) fails with the template's message.
Also a set of small templates exercising the rest of the Jinja subset (filters, tests, loops, slices, macros,
whitespace control) renders as jinja2 renders it.

Usage: chat_templates.py BIN_DIR
"""
import glob
import json
import os
import re
import sys

import jinja2
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer
from transformers.utils.chat_template_utils import render_jinja_template
from harness import Harness

H = Harness(sys.argv[1], "dsopen-chat-templates-")
W, b, run, must, check = H.work, H.b, H.run, H.must, H.check
FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures", "chat_templates")
MARKERS = re.compile(r"<[|｜][^<>\s'\"]{1,40}?[|｜]>|\[gMASK\]|<sop>|<eop>")

CONVERSATIONS = {
    "system+turns": ([{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Tell me a joke"}], True),
    "system+turns, no prompt": ([{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "Hi"},
                                 {"role": "assistant", "content": "Hello!"},
                                 {"role": "user", "content": "Tell me a joke"}], False),
    "one user turn": ([{"role": "user", "content": "Hi"}], True),
    "quotes, newlines, unicode": ([{"role": "user", "content": "  Line one\nline 'two' \"three\"  "},
                                   {"role": "assistant", "content": " 你好，世界！ {{ not a tag }} "},
                                   {"role": "user", "content": "ok\n\n"}], True),
    "ending with an assistant turn": ([{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}], False),
}


def train_tokenizer(specials, path):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=700, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=[AddedToken(s, special=True, normalized=False) for s in specials])
    tok.train(["/usr/share/games/fortunes/fortunes"], trainer)
    tok.save(path)


def reference(fx, messages, gen):
    kwargs = {k: fx[k] for k in ("bos_token", "eos_token") if fx.get(k)}
    out, _ = render_jinja_template(conversations=[messages], chat_template=fx["chat_template"],
                                   add_generation_prompt=gen, **kwargs)
    return out[0]


def ours(model_dir, messages, gen):
    path = os.path.join(W, "messages.json")
    with open(path, "w") as f:
        json.dump(messages, f, ensure_ascii=False)
    args = [b("tokenizer"), "chat", "--model", model_dir, "--messages", path, "--json"]
    if not gen:
        args.append("--no-generation-prompt")
    r = run(args)
    return r, (json.loads(r.stdout) if r.returncode == 0 else None)


for fixture in sorted(glob.glob(os.path.join(FIXTURES, "*.json"))):
    if fixture.endswith("rendered_reference.json"):
        continue
    fx = json.load(open(fixture))
    name = os.path.basename(fixture)[:-5]
    d = os.path.join(W, name)
    os.makedirs(d)
    specials = sorted({*MARKERS.findall(fx["chat_template"]), *(fx[k] for k in ("bos_token", "eos_token", "pad_token") if fx.get(k))})
    train_tokenizer(specials, os.path.join(d, "tokenizer.json"))
    config = {"chat_template": fx["chat_template"], "tokenizer_class": "PreTrainedTokenizerFast"}
    for k in ("bos_token", "eos_token", "pad_token"):
        if fx.get(k):
            config[k] = fx[k]
    with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, ensure_ascii=False)
    hf = AutoTokenizer.from_pretrained(d)
    for case, (messages, gen) in CONVERSATIONS.items():
        try:
            want = reference(fx, messages, gen)
        except jinja2.TemplateError as e:  # the template refuses this conversation: so must we
            r, _ = ours(d, messages, gen)
            check(r.returncode != 0 and str(e) in r.stderr, f"{name}: {case}: refused as transformers refuses ({e})")
            continue
        r, got = ours(d, messages, gen)
        if got is None:
            check(False, f"{name}: {case}: dsopen-tokenizer chat failed: {r.stderr.strip()[-300:]}")
            continue
        check(got["text"] == want, f"{name}: {case}: text equals transformers'" +
              ("" if got["text"] == want else f"\n  ours: {got['text']!r}\n  want: {want!r}"))
        ids = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=gen)
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        check(got.get("ids") == ids, f"{name}: {case}: ids equal apply_chat_template's (generation prompt: {gen})")
    check(json.loads(ours(d, CONVERSATIONS["one user turn"][0], True)[0].stdout)["format"].startswith("the model's"),
          f"{name}: the model directory's template is the one used")

# The rest of the subset, each against jinja2 as transformers configures it.
env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                   extensions=[jinja2.ext.loopcontrols])
env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)


def raise_exception(message):
    raise jinja2.TemplateError(message)


env.globals["raise_exception"] = raise_exception
SNIPPETS = [
    "{% for m in messages %}{{ loop.index }}/{{ loop.length }}{{ ',' if not loop.last }}{% endfor %}",
    "{{ messages | map(attribute='role') | join('|') }} {{ messages | selectattr('role', 'equalto', 'user') | list | length }}",
    "{{ (messages | first)['content'] | upper }} {{ (messages | last).content | lower | replace('o', '0') }}",
    "{{ messages[1:] | length }} {{ messages[::-1][0].role }} {{ 'abcdef'[1:4] }} {{ 'abc'[-1] }}",
    "{% set ns = namespace(n=0) %}{% for m in messages %}{% if m.role == 'user' %}{% set ns.n = ns.n + 1 %}{% endif %}"
    "{% endfor %}{{ ns.n }}",
    "{% for m in messages if m.role != 'system' %}[{{ m.content | trim }}]{% else %}none{% endfor %}",
    "{% for i in range(5) %}{% if i == 3 %}{% break %}{% endif %}{% if i == 1 %}{% continue %}{% endif %}{{ i }}{% endfor %}",
    "{{ 7 // 2 }} {{ -7 // 2 }} {{ 7 % 3 }} {{ 2 ** 10 }} {{ 7 / 2 }} {{ 1.5 + 1 }} {{ 'a' ~ 1 ~ none }} {{ 3 * 'ab' }}",
    "{{ x is defined }} {{ x is not defined }} {{ none is none }} {{ 'a' is string }} {{ 4 is even }} {{ {} is mapping }}",
    "{{ {'a': 1, 'b': [1, 2.5, 'x', none, true]} | tojson }}\n{{ {'k': 'v'} | tojson(indent=2) }}",
    "{{ messages | tojson }}",
    "{% macro tag(name, body='x') %}<{{ name }}>{{ body }}</{{ name }}>{% endmacro %}{{ tag('b') }}{{ tag('i', 'y') }}",
    "  {% if true %}\n    kept\n  {% endif %}\n{%- if true -%}   tight   {%- endif %}\n{# comment #}\nend",
    "{% set x %}block {{ 1 + 1 }}{% endset %}{{ x }} {{ [1, 2, 3] | sum if false else [3, 1, 2] | sort | list }}",
    "{{ 'a,b,,c'.split(',') }} {{ '  x  '.strip() }}|{{ 'Hello'.startswith('He') }} {{ 'abc'.endswith(('x', 'c')) }}",
    "{{ 'x' if messages | length > 2 else 'y' }} {{ 1 in [1, 2] }} {{ 'ell' in 'hello' }} {{ 'k' not in {'k': 1} }}",
    "{% for k, v in {'a': 1, 'b': 2}.items() %}{{ k }}={{ v }};{% endfor %} {{ {'a': 1}.get('b', 'none') }}",
    "{{ [1, [2, 'x']] }} {{ {'a': 'it''s'} }} {{ true }} {{ 1.0 }} {{ 10000000000000000.0 }} {{ 0.1 + 0.2 }}",
    "{{ messages | length }}{{ raise_exception('no ' + 'way') if messages | length > 10 }}",
]
messages = CONVERSATIONS["system+turns"][0]
for i, src in enumerate(SNIPPETS):
    try:
        want = env.from_string(src).render(messages=messages)
    except Exception as e:  # noqa: BLE001 - a snippet jinja2 itself rejects is a bad snippet
        sys.exit(f"snippet {i} does not render in jinja2: {e}")
    d = os.path.join(W, f"snippet{i}")
    os.makedirs(d)
    for f in ("tokenizer.json",):
        os.link(os.path.join(W, "deepseek-llm-7b-chat", f), os.path.join(d, f))
    with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
        json.dump({"chat_template": src}, f)
    r, got = ours(d, messages, False)
    ok = got is not None and got["text"] == want
    check(ok, f"snippet {i} renders as jinja2" + ("" if ok else f"\n  src:  {src!r}\n  ours: "
                                                            f"{got['text'] if got else r.stderr.strip()!r}\n  want: {want!r}"))

# Errors: a syntax error names the template line; raise_exception's message reaches the user.
d = os.path.join(W, "broken")
os.makedirs(d)
os.link(os.path.join(W, "deepseek-llm-7b-chat", "tokenizer.json"), os.path.join(d, "tokenizer.json"))
with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
    json.dump({"chat_template": "line one\n{% if messages %}\n{{ messages | nosuchfilter }}\n{% endif %}"}, f)
r, _ = ours(d, messages, True)
check(r.returncode == 1 and "line 3" in r.stderr and "nosuchfilter" in r.stderr,
      f"an unknown filter is an error naming the template line: {r.stderr.strip()}")
with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
    json.dump({"chat_template": "{% for m in messages %}\n{{ m.content }"}, f)
r, _ = ours(d, messages, True)
check(r.returncode == 1 and "line 2" in r.stderr, f"an unclosed tag is an error naming its line: {r.stderr.strip()}")
H.finish()
