"""An Ollama ``Modelfile`` beside a GGUF output: ``FROM`` the file, the chat template in Ollama's Go
template form where the model's Jinja template is one of the families below (recognised by its
markers), and the stop tokens. Without a mapped template Ollama reads the GGUF's own chat template."""

from __future__ import annotations

from pathlib import Path

CHATML = """{{- if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}{{- range .Messages }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}<|im_start|>assistant
"""
LLAMA3 = """{{- if .System }}<|start_header_id|>system<|end_header_id|>

{{ .System }}<|eot_id|>{{ end }}{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>

{{ .Content }}<|eot_id|>{{ end }}<|start_header_id|>assistant<|end_header_id|>

"""
GEMMA = """{{- range .Messages }}<start_of_turn>{{ if eq .Role "assistant" }}model{{ else }}{{ .Role }}{{ end }}
{{ .Content }}<end_of_turn>
{{ end }}<start_of_turn>model
"""
PHI3 = """{{- if .System }}<|system|>
{{ .System }}<|end|>
{{ end }}{{- range .Messages }}<|{{ .Role }}|>
{{ .Content }}<|end|>
{{ end }}<|assistant|>
"""
MISTRAL = """{{- range .Messages }}{{ if eq .Role "user" }}[INST] {{ .Content }} [/INST]
{{- else if eq .Role "assistant" }}{{ .Content }}</s>{{ end }}{{ end }}"""

# family: (markers the Jinja template holds, Ollama template, its stop tokens)
FAMILIES = {
    "llama3": (
        ("<|start_header_id|>", "<|eot_id|>"),
        LLAMA3,
        ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
    ),
    "chatml": (("<|im_start|>", "<|im_end|>"), CHATML, ["<|im_start|>", "<|im_end|>"]),
    "gemma": (("<start_of_turn>", "<end_of_turn>"), GEMMA, ["<start_of_turn>", "<end_of_turn>"]),
    "phi3": (("<|assistant|>", "<|end|>"), PHI3, ["<|end|>", "<|user|>", "<|assistant|>"]),
    "mistral": (("[INST]", "[/INST]"), MISTRAL, ["[INST]", "[/INST]"]),
}


def family(chat_template: str | None) -> str | None:
    """The template family whose markers all appear in ``chat_template`` (the first that fits)."""
    if not chat_template:
        return None
    return next((name for name, (marks, _, _) in FAMILIES.items() if all(m in chat_template for m in marks)), None)


def modelfile(gguf_name: str, chat_template: str | None, stops: list[str]) -> tuple[str, str | None]:
    """The Modelfile text and the template family used (None: Ollama takes the GGUF's own template)."""
    fam = family(chat_template)
    lines = [f"FROM ./{gguf_name}", ""]
    stop = list(stops)
    if fam is not None:
        _, template, extra = FAMILIES[fam]
        lines += [f'TEMPLATE """{template}"""', ""]
        stop += [s for s in extra if s not in stop]
    lines += [f'PARAMETER stop "{s}"' for s in stop if s]
    return "\n".join(lines) + "\n", fam


def write_modelfile(path: Path, gguf_name: str, chat_template: str | None, stops: list[str]) -> str | None:
    text, fam = modelfile(gguf_name, chat_template, stops)
    path.write_text(text, encoding="utf-8")
    return fam
