"""Chat templates render as transformers renders them, and a hostile template is stopped in bounded time and
memory with one line."""

import resource
import sys
import time
from pathlib import Path

import pytest
from salachat.engine.gguf_file import GGUFFile
from salachat.engine.tokenizer import Tokenizer, TokenizerError

transformers = pytest.importorskip("transformers")

MESSAGES = [
    {"role": "system", "content": "Réponds en français — brièvement."},
    {"role": "user", "content": "Quel est le café le plus proche? <b>&</b> 日本語"},
    {"role": "assistant", "content": "Le café « Zoé »."},
    {"role": "user", "content": "Merci 🙂"},
]

FEATURES = {
    "loop controls": (
        "{% for m in messages %}{% if m.role == 'system' %}{% continue %}{% endif %}"
        "{% if loop.index > 3 %}{% break %}{% endif %}[{{ m.role }}]{{ m.content }}\n{% endfor %}"
    ),
    "tojson keeps non-ASCII, no HTML escaping": "{{ messages | tojson }}|{{ messages[1] | tojson(indent=2) }}",
    "strftime_now": "Today is {{ strftime_now('%d %B %Y') }}.{% for m in messages %}{{ m.content }}{% endfor %}",
    "namespace and trim": (
        "{% set ns = namespace(system='') %}\n{% for m in messages %}\n  {% if m.role == 'system' %}\n"
        "    {% set ns.system = m.content %}\n  {% endif %}\n{% endfor %}\nSYSTEM={{ ns.system }}\n"
        "{% for m in messages[1:] %}\n<|{{ m.role }}|>{{ m.content | trim }}\n{% endfor %}\n"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    ),
    "bos and eos": "{{ bos_token }}{% for m in messages %}{{ m.content }}{{ eos_token }}{% endfor %}",
}


def _write_tokenizer(folder: Path) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from sala_tiny import _write_tokenizer

    _write_tokenizer(folder, 320)


def _reference(folder: Path, template: str):
    _write_tokenizer(folder)
    reference = transformers.PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"),
                                                     bos_token="<s>", eos_token="</s>")
    reference.chat_template = template
    return reference


def _ours(folder: Path, template: str) -> Tokenizer:
    if not (folder / "tokenizer.json").is_file():
        _write_tokenizer(folder)
    tokenizer = Tokenizer.from_hf_folder(folder)
    tokenizer.chat_template, tokenizer._template = template, None
    tokenizer.bos_token, tokenizer.eos_token = "<s>", "</s>"
    return tokenizer


@pytest.mark.parametrize("name", list(FEATURES))
def test_templates_render_as_transformers_renders_them(tmp_path, name):
    template = FEATURES[name]
    reference = _reference(tmp_path, template)
    expected = reference.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert _ours(tmp_path, template).apply_chat_template(MESSAGES, add_generation_prompt=True) == expected


def test_the_default_models_template_renders_as_transformers_renders_it(tmp_path, smollm2_path):
    template = GGUFFile.open(smollm2_path).metadata["tokenizer.chat_template"]
    reference = _reference(tmp_path, template)
    for generation in (True, False):
        expected = reference.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=generation)
        assert _ours(tmp_path, template).apply_chat_template(MESSAGES, add_generation_prompt=generation) == expected


def test_raise_exception_is_one_line(tmp_path):
    template = "{% if messages[0].role != 'user' %}{{ raise_exception('Conversation must start with user') }}{% endif %}"
    with pytest.raises(TokenizerError, match="Conversation must start with user"):
        _ours(tmp_path, template).apply_chat_template(MESSAGES)


HOSTILE = {
    "nested loops without output": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "huge range": "{% for i in range(10**12) %}{{ i }}{% endfor %}",
    "output that doubles": "{% set ns = namespace(s='x') %}{% for i in range(80) %}{% set ns.s = ns.s ~ ns.s %}"
                           "{% endfor %}{{ ns.s }}",
    "output that loops": "{% for i in range(100000) %}{% for m in messages %}{{ m.content * 50 }}{% endfor %}"
                         "{% endfor %}",
    "string times a billion": "{{ 'x' * 1000000000 }}",
    "list times a billion": "{% set l = [0] * 1000000000 %}{{ l | length }}",
    "power": "{{ 10 ** 100000000 }}",
    "recursive macro": "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    "branching macro": "{% macro f(n) %}{% if n < 40 %}{{ f(n + 1) }}{{ f(n + 1) }}{% endif %}{% endmacro %}{{ f(0) }}",
    "does not parse": "{% for m in messages %}{{ m.content }",
    "undefined method": "{{ messages.__class__.__mro__ }}{{ ''.__class__.__subclasses__() }}",
    "zero division": "{{ 1 / 0 }}",
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_templates_stop_in_bounded_time_and_memory(tmp_path, name):
    (tmp_path / "m").mkdir()
    tokenizer = _ours(tmp_path / "m", HOSTILE[name])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    with pytest.raises(TokenizerError) as info:
        tokenizer.apply_chat_template(MESSAGES)
    assert time.perf_counter() - start < 15
    assert "\n" not in str(info.value)
    assert (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024 < 600  # MiB
