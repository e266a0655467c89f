"""`zerolm export --format ollama`'s Modelfile (zerolm/interop/ollama.py): its TEMPLATE, rendered
as Ollama renders it (Go's text/template, here tests/interop/gotemplate.py: Go and Ollama are not
installed), gives the chat template's own text for zerolm's format, SmolLM2's ChatML and the real
templates of tests/fixtures/chat_templates, or modelfile() refuses with a one-line reason.

The first half tests the Go-template interpreter itself against hand-written expectations and two
real Ollama templates."""

import re
import shutil
from pathlib import Path

import pytest

# tests/interop is on sys.path (pytest's default "prepend" import mode, no __init__.py here)
from gotemplate import GoTemplateError, render
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.processors import TemplateProcessing

from zerolm.interop.ollama import DOCS, added_prefix, chat_renderer, modelfile
from zerolm.tokenizer import Tokenizer
from zerolm.tokenizer.chat import render as chat_render

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "chat_templates"


# ---------------------------------------------------------------- the Go-template interpreter
@pytest.mark.parametrize(
    ("source", "data", "want"),
    [
        ("plain {{ .A }} {{ 7 }} {{ true }}", {"A": "x"}, "plain x 7 true"),
        ("a  \n\t{{- .A -}} \n b", {"A": "1"}, "a1b"),  # trim all adjacent white space
        ("a {{- .A }} {{- .A }} b", {"A": "1"}, "a11 b"),  # only the text next to the marker
        ("a {{-3}} b", {}, "a -3 b"),  # "{{-3" is the number -3, not a trim marker
        ("a {{/* note */}} b{{- /* c */ -}} c", {}, "a  bc"),
        ('{{ "abc" | len }} {{ 1 | eq 1 }} {{ .L | len }}', {"L": [1, 2]}, "3 true 2"),
        ('{{ $x := "a" }}{{ $x }}{{ $x = "b" }}{{ $x }}', {}, "ab"),
        ("{{ range .L }}{{ $.N }}{{ . }}{{ end }}", {"L": ["a", "b"], "N": 0}, "0a0b"),
        ("{{ range $i, $v := .L }}{{ $i }}={{ $v }};{{ end }}", {"L": ["a", "b"]}, "0=a;1=b;"),
        ("{{ range $v := .L }}{{ $v }}{{ else }}none{{ end }}", {"L": []}, "none"),
        ("{{ if .A }}1{{ else if .B }}2{{ else }}3{{ end }}", {"A": "", "B": 0}, "3"),
        ("{{ if .A }}1{{ else if .B }}2{{ else }}3{{ end }}", {"A": [], "B": 5}, "2"),
        ('{{ eq 2 1 2 }} {{ ne .R "user" }} {{ not 0 }}', {"R": "user"}, "true false true"),
        ('{{ and 1 0 }} {{ or "" "x" }} {{ and 0 (index .L 9) }}', {"L": []}, "0 x 0"),
        ('{{ len "é" }} {{ slice "abc" 1 }} {{ slice .L 1 2 | len }}', {"L": [1, 2, 3]}, "2 bc 1"),
        (
            '{{ index .M "k" 1 }} {{ (index .L 0).Role }}',
            {"M": {"k": [5, 6]}, "L": [{"Role": "u"}]},
            "6 u",
        ),
        ('{{ "a\\tb\\u00e9\\x41\\"" }} {{ `r\\n` }}', {}, 'a\tbéA" r\\n'),
        ("{{ $last := eq (len (slice $.L 1)) 1 }}{{ $last }}", {"L": [1, 2]}, "true"),
    ],
)
def test_go_template_constructs(source, data, want):
    assert render(source, data) == want


@pytest.mark.parametrize(
    ("source", "data", "error"),
    [
        ("{{ with .A }}x{{ end }}", {"A": 1}, "not implemented"),
        ('{{ template "x" }}', {}, "not implemented"),
        ('{{ printf "%d" 1 }}', {}, "not implemented"),
        ("{{ .Missing }}", {}, "can't evaluate field Missing"),
        ("{{ if true }}{{ $y := 1 }}{{ end }}{{ $y }}", {}, "undefined variable"),
        ("{{ end }}", {}, "unexpected"),
        ("{{ if true }}x", {}, "missing {{end}}"),
        ('{{ eq "a" 1 }}', {}, "incompatible types"),
        ("{{ 'a' }}", {}, "unexpected"),
        ("{{ .A", {"A": 1}, "no }}"),
        ("{{ range .A }}{{ end }}", {"A": 3}, "range over int"),
    ],
)
def test_go_template_refuses_what_it_does_not_implement(source, data, error):
    with pytest.raises(GoTemplateError, match=re.escape(error)):
        render(source, data)


# Ollama's conversations of template/template_test.go (TestTemplate), roles and contents
OLLAMA_CASES = {
    "user": [("user", "Hello, how are you?")],
    "user-assistant-user": [
        ("user", "Hello, how are you?"),
        ("assistant", "I'm doing great. How can I help you today?"),
        ("user", "I'd like to show off how chat templating works!"),
    ],
}
OLLAMA_CASES["system-user-assistant-user"] = [
    ("system", "You are a helpful assistant."),
    *OLLAMA_CASES["user-assistant-user"],
]
# ollama/ollama template/chatml.gotmpl (commit 9fbfa742); its expected renderings are
# template/testdata/chatml.gotmpl/<case>: each message as <|im_start|>role\ncontent<|im_end|>\n
OLLAMA_CHATML = (
    "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
    "<|im_start|>assistant\n"
)
# phi4's template from Ollama's library as `ollama show` returns it (test data of
# github.com/padiazg/ollama-tools, listmodels): Ollama's modern $last form
OLLAMA_PHI4 = (
    "{{- range $i, $_ := .Messages }}\n{{- $last := eq (len (slice $.Messages $i)) 1 -}}\n"
    "<|im_start|>{{ .Role }}<|im_sep|>\n{{ .Content }}{{ if not $last }}<|im_end|>\n{{ end }}\n"
    '{{- if and (ne .Role "assistant") $last }}<|im_end|>\n<|im_start|>assistant<|im_sep|>\n'
    "{{ end }}\n{{- end }}"
)


def ollama_data(messages: list[dict], system: str | None = None) -> dict:
    """What Ollama hands a TEMPLATE: server/routes.go prepends the Modelfile's SYSTEM when the
    conversation has no system message first; template.go's collate merges consecutive messages
    of one role with "\\n\\n" and joins the system contents as .System."""
    if system and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system}, *messages]
    merged: list[dict] = []
    for m in messages:
        if merged and merged[-1]["Role"] == m["role"]:
            merged[-1]["Content"] += "\n\n" + m["content"]
        else:
            merged.append({"Role": m["role"], "Content": m["content"]})
    sys_text = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    return {"System": sys_text, "Messages": merged, "Tools": [], "Response": "", "Think": False}


@pytest.mark.parametrize("case", sorted(OLLAMA_CASES))
def test_real_ollama_templates_render_as_ollama_expects(case):
    messages = [{"role": r, "content": c} for r, c in OLLAMA_CASES[case]]
    chatml = "".join(f"<|im_start|>{r}\n{c}<|im_end|>\n" for r, c in OLLAMA_CASES[case])
    assert render(OLLAMA_CHATML, ollama_data(messages)) == chatml + "<|im_start|>assistant\n"
    phi4 = "<|im_end|>\n".join(f"<|im_start|>{r}<|im_sep|>\n{c}" for r, c in OLLAMA_CASES[case])
    want = phi4 + "<|im_end|>\n<|im_start|>assistant<|im_sep|>\n"
    assert render(OLLAMA_PHI4, ollama_data(messages)) == want
    # a final assistant message stays open in Ollama's own templates (it continues it)
    reply = [*messages, {"role": "assistant", "content": "Sure"}]
    assert render(OLLAMA_PHI4, ollama_data(reply)).endswith("<|im_start|>assistant<|im_sep|>\nSure")


# ---------------------------------------------------------------- the Modelfile
def parse_modelfile(text: str) -> list[tuple[str, str]]:
    """(command, argument) pairs as Ollama's parser/parser.go reads them: a value in \"\"\"...\"\"\"
    runs to the first line that ends with \"\"\"; "..." is one line; PARAMETER's argument keeps
    its name ("stop <|end|>"). Ollama drops unprintable characters: none may be there."""
    assert all(c.isprintable() or c in "\n\t" for c in text)
    out, lines = [], text.split("\n")
    while lines:
        line = lines.pop(0)
        if not line.strip() or line.startswith("#"):
            continue
        name, _, value = line.partition(" ")
        if name == "PARAMETER":
            key, _, value = value.partition(" ")
            name = f"PARAMETER {key}"
        if value.startswith('"""'):
            while not (value.rstrip().endswith('"""') and len(value.rstrip()) >= 6):
                value += "\n" + lines.pop(0)
            value = value.rstrip()[3:-3]
        elif value.startswith('"'):
            assert value.endswith('"')
            value = value[1:-1]
        out.append((name, value))
    return out


def tokenizer_with(smollm2_hf, out: Path, template: str) -> Tokenizer:
    """SmolLM2's tokenizer files with `template` as chat_template.jinja (as the chat template
    tests pair the real templates with a tokenizer)."""
    out.mkdir(parents=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copyfile(Path(smollm2_hf) / name, out / name)
    (out / "chat_template.jinja").write_text(template, encoding="utf-8")
    return Tokenizer.load(out)


CONVERSATIONS = {
    "system + user": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2+2?"},
    ],
    "user only": [{"role": "user", "content": "Hi there"}],
    "multi-turn": [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "写一首诗"},
    ],
    "ends with the assistant": [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "床前明月光，疑是地上霜。"},
    ],
}


def assert_ollama_renders_the_chat_template(tok: Tokenizer) -> dict:
    """The Modelfile's commands, after checking that its TEMPLATE, given Ollama's data with and
    without the Modelfile's SYSTEM, renders each conversation as the chat template does (with
    the generation prompt unless it ends with the assistant), and its stops are tok's."""
    commands = parse_modelfile(modelfile(tok, "model.gguf"))
    names = [n for n, _ in commands]
    assert names[:2] == ["FROM", "TEMPLATE"] and set(names[2:]) <= {"SYSTEM", "PARAMETER stop"}
    found = dict(commands)
    assert found["FROM"] == "./model.gguf"
    assert [v for n, v in commands if n == "PARAMETER stop"] == [
        tok.token_str(i) for i in tok.stop_ids
    ]
    jinja, _ = chat_renderer(tok)
    added = added_prefix(tok)  # llama.cpp and Ollama put it before the TEMPLATE's text
    for messages in CONVERSATIONS.values():
        generation = messages[-1]["role"] != "assistant"
        want = jinja(messages, generation).removeprefix(added)
        for system in (None, found.get("SYSTEM")):
            assert render(found["TEMPLATE"], ollama_data(messages, system)) == want
    return found


def test_zerolm_format(tiny_tokenizer):
    tok = tiny_tokenizer()
    found = assert_ollama_renders_the_chat_template(tok)
    assert "SYSTEM" not in found
    assert modelfile(tok, "m.gguf").endswith('PARAMETER stop "<|end|>"\nPARAMETER stop "<|eos|>"\n')
    for messages in CONVERSATIONS.values():  # Ollama's prompt is the ids zerolm trains on
        generation = messages[-1]["role"] != "assistant"
        text = render(found["TEMPLATE"], ollama_data(messages))
        assert tok.encode(text) == chat_render(tok, messages, generation)[0]


def test_smollm2_chatml(smollm2_hf):
    tok = Tokenizer.load(smollm2_hf)
    assert added_prefix(tok) == ""  # SmolLM2 adds no bos: the TEMPLATE's text is the prompt
    found = assert_ollama_renders_the_chat_template(tok)
    assert found["SYSTEM"] == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    assert found["TEMPLATE"].count("<|im_start|>") == 5  # default system, 3 roles, generation
    docs = (Path(__file__).resolve().parents[2] / "docs" / "ollama.md").read_text(encoding="utf-8")
    assert f"```\n{modelfile(tok, 'model.gguf')}```" in docs  # the page shows the real output


# the fixtures modelfile() writes, and the ones it refuses with why (docs/ollama.md lists them)
EXPRESSED = [
    "Qwen-Qwen2.5-7B-Instruct",
    "ibm-granite-granite-4.0",
    "microsoft-Phi-3.5-mini-instruct",
]
NOT_THE_SUM = "is not the sum of its messages' parts"
REFUSED = {
    "HuggingFaceTB-SmolLM3-3B": f"(system, user) {NOT_THE_SUM}",  # rewrites the system message
    "Mistral-Small-3.2-24B-Instruct-2506": "today's date",
    "Qwen-QwQ-32B": NOT_THE_SUM,  # lstrips replies, cuts out their reasoning
    "Qwen-Qwen3-0.6B": f"(user, assistant, user) {NOT_THE_SUM}",
    "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B": f"(user, assistant, user, assistant) {NOT_THE_SUM}",
    "deepseek-ai-DeepSeek-V3.1": f"(user, assistant, user, assistant) {NOT_THE_SUM}",
    "ibm-granite-granite-3.3-2B-Instruct": "today's date",
    "mistralai-Mistral-Nemo-Instruct-2407": "a user turn is written differently",
}


def test_every_fixture_is_either_expressed_or_refused():
    assert sorted([*EXPRESSED, *REFUSED]) == sorted(p.stem for p in FIXTURES.glob("*.jinja"))


@pytest.mark.parametrize("name", EXPRESSED)
def test_real_template_as_an_ollama_template(name, smollm2_hf, tmp_path):
    source = (FIXTURES / f"{name}.jinja").read_text()
    assert_ollama_renders_the_chat_template(tokenizer_with(smollm2_hf, tmp_path / name, source))


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_real_template_refused_with_the_reason(name, smollm2_hf, tmp_path):
    tok = tokenizer_with(smollm2_hf, tmp_path / name, (FIXTURES / f"{name}.jinja").read_text())
    with pytest.raises(ValueError, match=re.escape(REFUSED[name])) as e:
        modelfile(tok, "model.gguf")
    message = str(e.value)
    assert "cannot be written as an Ollama TEMPLATE" in message and DOCS in message
    assert name in message and "\n" not in message


CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + CONTENT + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


PLAIN_CHATML = CHATML.replace("CONTENT", "m['content']")


def test_a_template_that_trims_content_is_refused(smollm2_hf, tmp_path):
    tok = tokenizer_with(
        smollm2_hf, tmp_path / "t", CHATML.replace("CONTENT", "m['content'] | trim")
    )
    with pytest.raises(ValueError, match="renders differently|not the sum"):
        modelfile(tok, "model.gguf")
    plain = tokenizer_with(smollm2_hf, tmp_path / "p", PLAIN_CHATML)
    assert_ollama_renders_the_chat_template(plain)


def test_markup_go_or_the_modelfile_would_misread_is_a_go_string(smollm2_hf, tmp_path):
    """Template text with "{{", a triple quote or a control character is written as a Go string
    literal ({{ "..." }}): the Modelfile parser and Go both keep it exactly."""
    odd = CHATML.replace("'<|im_start|>' +", '\'{{"""\\x07\' +').replace("CONTENT", "m['content']")
    tok = tokenizer_with(smollm2_hf, tmp_path / "odd", odd)
    found = assert_ollama_renders_the_chat_template(tok)
    assert '{{ "{{\\"\\"\\"\\u0007' in found["TEMPLATE"]


def test_bad_inputs_are_one_line_errors(smollm2_hf, tmp_path, tiny_tokenizer):
    for name in ("", "dir/model.gguf", "model\n.gguf"):
        with pytest.raises(ValueError, match="is not a file name"):
            modelfile(tiny_tokenizer(), name)
    out = tmp_path / "bare"
    out.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copyfile(Path(smollm2_hf) / name, out / name)
    with pytest.raises(ValueError, match="has no chat template") as e:
        modelfile(Tokenizer.load(out), "model.gguf")
    assert "\n" not in str(e.value)


def test_a_bos_the_tokenizer_adds_itself_is_left_to_ollama(smollm2_hf, tmp_path):
    """A tokenizer that puts bos before every text makes llama.cpp (and so Ollama) add it to
    every prompt: the TEMPLATE must not write it again, though the chat template does."""
    tok = tokenizer_with(smollm2_hf, tmp_path / "bos", "{{ bos_token }}" + PLAIN_CHATML)
    bos = tok.token_names["bos_token"]
    hf = HFTokenizer.from_file(str(tmp_path / "bos" / "tokenizer.json"))
    hf.post_processor = TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, tok.bos_id)])
    hf.save(str(tmp_path / "bos" / "tokenizer.json"))
    tok = Tokenizer.load(tmp_path / "bos")
    assert added_prefix(tok) == bos
    found = assert_ollama_renders_the_chat_template(tok)
    messages = CONVERSATIONS["user only"]
    assert chat_renderer(tok)[0](messages, True).startswith(bos + "<|im_start|>user")
    assert render(found["TEMPLATE"], ollama_data(messages)).startswith("<|im_start|>user")
