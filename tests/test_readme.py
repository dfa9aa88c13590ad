"""Every code block of README.md runs as written, with the built-in model standing in for hub checkpoints.

The convention (also in the README's Development section):
- each `##` section runs in a fresh scratch folder holding `examples/shapes.png` and the files the README
  names as the reader's own: `photo.jpg`, `photo2.jpg`, `receipt.jpg`, `img/0001.png`, `train.jsonl`,
  `val.jsonl` (examples in the README's training format) and `requests.jsonl` (one `idefics2 batch` request);
- `python` blocks run in order in one namespace per section, as if pasted into one Python session;
- in `bash` blocks every `idefics2 ...` command (also after `&&`; `\\` continues a line) runs and must exit
  with 0; other commands (pip, pytest, python scripts, torchrun, curl) are not run; `idefics2 serve` starts
  in the background, is waited for until `GET /health` answers, and stops at the end of the section, so that
  the section's later blocks talk to it;
- `json` blocks must parse, and a block holding a training example must pass the training data check;
- `yaml` blocks (Ray Serve configs) must parse, and every application's `import_path` must import;
- `text` blocks that start with `$ idefics2 chat` are replayed: the `> ` lines are typed in, the other lines
  (except the `(...)` notes on stderr) must be the answers;
- the hub ids of SUBSTITUTIONS become the built-in model's folder;
- an HTML comment right before a block changes how it runs, with the reason in parentheses:
  `<!-- readme-test: skip (reason) -->` does not run it, `<!-- readme-test: replace "OLD" "NEW" (reason) -->`
  runs it with OLD replaced by NEW (e.g. fewer steps; repeat the comment for several replacements).
"""

from __future__ import annotations

import io
import json
import re
import shlex
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from PIL import Image

from idefics2.assets import builtin_model_dir
from idefics2.cli import main
from idefics2.server.process import ServerProcess

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
SUBSTITUTIONS = {"HuggingFaceM4/idefics2-8b": str(builtin_model_dir())}
DIRECTIVE = re.compile(r"<!--\s*readme-test:\s*(?P<body>.*?)\s*-->")


@dataclass
class Block:
    section: str
    line: int  # 1-based line of the opening fence
    language: str
    text: str
    skip: str | None = None  # the reason
    replacements: list[tuple[str, str]] = field(default_factory=list)

    def runnable_text(self) -> str:
        text = self.text
        for old, new in self.replacements:
            assert old in text, f"README.md:{self.line}: readme-test replace: {old!r} is not in the block"
            text = text.replace(old, new)
        for old, new in SUBSTITUTIONS.items():
            text = text.replace(old, new)
        return text


def parse_directive(body: str, line: int) -> tuple[str, list[str]]:
    match = re.fullmatch(r"(?P<words>.*?)\s*\((?P<reason>[^()]+)\)", body)
    assert match, f"README.md:{line}: a readme-test comment needs a reason in parentheses: {body!r}"
    words = shlex.split(match["words"])
    assert words and words[0] in ("skip", "replace"), f"README.md:{line}: unknown readme-test: {body!r}"
    assert len(words) == (1 if words[0] == "skip" else 3), f"README.md:{line}: malformed: {body!r}"
    return match["reason"], words


def readme_blocks() -> list[Block]:
    blocks, section, directives = [], "introduction", []
    lines = README.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("## "):
            section = line[3:].strip()
        found = DIRECTIVE.fullmatch(line.strip())
        if found:
            directives.append(parse_directive(found["body"], i + 1))
        elif line.startswith("```"):
            end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
            block = Block(section, i + 1, line[3:].strip(), "\n".join(lines[i + 1 : end]) + "\n")
            for reason, words in directives:
                if words[0] == "skip":
                    block.skip = reason
                else:
                    block.replacements.append((words[1], words[2]))
            blocks.append(block)
            directives, i = [], end
        elif line.strip():
            assert not directives, f"README.md:{i + 1}: a readme-test comment must come right before a block"
        i += 1
    return blocks


BLOCKS = readme_blocks()
SECTIONS = list(
    dict.fromkeys(b.section for b in BLOCKS if b.language in ("python", "bash", "json", "text", "yaml"))
)


def training_example(image: str) -> dict:
    question = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown?"}]}
    return {"messages": [question, {"role": "assistant", "content": "Shapes."}], "images": [image]}


def scratch_folder(folder: Path) -> Path:
    """The files the README's commands name as the reader's own."""
    (folder / "examples").mkdir()
    shutil.copy(REPO / "examples" / "shapes.png", folder / "examples" / "shapes.png")
    from idefics2.shapes import make_dataset

    scenes = make_dataset(1, seed=3)
    for scene, name in zip(scenes, ("photo.jpg", "photo2.jpg", "receipt.jpg"), strict=False):
        scene.images()[0].save(folder / name, quality=90)
    (folder / "img").mkdir()
    Image.open(REPO / "examples" / "shapes.png").save(folder / "img" / "0001.png")
    lines = [json.dumps(training_example("img/0001.png"))] * 2
    (folder / "train.jsonl").write_text("\n".join(lines) + "\n")
    (folder / "val.jsonl").write_text(lines[0] + "\n")
    request = {"id": 1, "images": ["photo.jpg"], "prompt": "What is in this image?"}
    (folder / "requests.jsonl").write_text(json.dumps(request) + "\n")
    return folder


def commands(bash: str) -> list[list[str]]:
    """The `idefics2 ...` commands of a bash block, as argument lists."""
    found = []
    for logical in bash.replace("\\\n", " ").splitlines():
        for segment in logical.split("&&"):
            if not segment.strip().startswith("idefics2 "):
                continue  # curl and other commands, whose quoting shlex need not follow
            words = shlex.split(segment, comments=True)
            if words and words[0] == "idefics2":
                found.append(words[1:])
    return found


def run_command(argv: list[str], capsys, monkeypatch, stdin: str = "") -> tuple[str, str]:
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    try:
        code = main(argv)
    except SystemExit as exit_info:
        code = exit_info.code
    out, err = capsys.readouterr()
    assert code == 0, f"idefics2 {shlex.join(argv)} exited with {code}: {err}"
    return out, err


def start_server(argv: list[str], log: Path) -> ServerProcess:
    """`idefics2 serve ...` in a child process (on the README's port, 8000 unless it names one), once it
    answers GET /health."""
    port = None if "--port" in argv else 8000
    try:
        with log.open("wb") as sink:
            return ServerProcess(argv[1:], port=port, timeout=120, stdout=sink, stderr=sink)
    except RuntimeError as error:
        raise AssertionError(f"idefics2 {shlex.join(argv)}: {error}: {log.read_text()}") from None


def replay_chat(block: Block, capsys, monkeypatch) -> None:
    lines = block.runnable_text().splitlines()
    argv = shlex.split(lines[0].removeprefix("$ "))[1:]
    typed = [line[2:] for line in lines[1:] if line.startswith("> ")]
    expected = [line for line in lines[1:] if line and not line.startswith(("> ", "("))]
    out, _ = run_command(argv, capsys, monkeypatch, stdin="\n".join(typed) + "\n")
    assert out.splitlines() == expected, f"README.md:{block.line}: the transcript's answers differ"


@pytest.mark.parametrize("section", SECTIONS)
def test_readme_section_runs_as_written(section, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(scratch_folder(tmp_path))
    namespace: dict = {"__name__": "__readme__"}
    servers: list[ServerProcess] = []
    try:
        run_section(section, namespace, servers, tmp_path, capsys, monkeypatch)
    finally:
        for server in servers:
            server.stop(timeout=60)


def run_section(section, namespace, servers, tmp_path, capsys, monkeypatch) -> None:
    for block in (b for b in BLOCKS if b.section == section and not b.skip):
        where = f"README.md:{block.line}"
        if block.language == "python":
            exec(compile(block.runnable_text(), where, "exec"), namespace)
            capsys.readouterr()
        elif block.language == "bash":
            for argv in commands(block.runnable_text()):
                if argv[0] == "serve":
                    servers.append(start_server(argv, tmp_path / f"server-{len(servers)}.log"))
                else:
                    run_command(argv, capsys, monkeypatch)
        elif block.language == "json":
            example = json.loads(block.text)
            if "messages" in example:
                from idefics2.training.data import normalize_example

                normalize_example(example, base_dir=Path.cwd())
        elif block.language == "text" and block.text.startswith("$ idefics2 chat"):
            replay_chat(block, capsys, monkeypatch)
        elif block.language == "yaml":  # a Ray Serve config: it must parse and name importable builders
            import importlib

            import yaml

            config = yaml.safe_load(block.text)
            for application in config.get("applications", []):
                module, _, name = application["import_path"].partition(":")
                assert callable(getattr(importlib.import_module(module), name)), (where, application)


def test_the_convention_is_followed():
    languages = {b.language for b in BLOCKS}
    assert languages <= {"python", "bash", "json", "text", "yaml"}, languages  # every block is checked
    assert all(b.skip.strip() for b in BLOCKS if b.skip is not None)
    # hub ids in blocks that run are ones the test can replace with the built-in model
    for block in BLOCKS:
        if not block.skip and block.language in ("python", "bash"):
            text = block.runnable_text()
            assert "HuggingFaceM4/" not in text, f"README.md:{block.line}: a hub id without a substitution"


def test_the_built_in_model_table_is_the_recorded_evaluation():
    """The accuracy table equals eval_results.json (written by scripts/build_builtin_model.py --export), and
    its commands use the script's held-out seed."""
    recorded = json.loads((builtin_model_dir() / "eval_results.json").read_text())
    rows = {"plain renders": "plain", "anti-aliased": "antialiased", "JPEG quality": "jpeg"}
    rows |= {"a second": "analytic", "JSON, constrained": "json"}  # the last in the Structured output table
    text = README.read_text(encoding="utf-8")
    header = next(line for line in text.splitlines() if line.startswith("| | overall |"))
    columns = [c.strip() for c in header.strip("|").split("|")][1:]
    checked = set()
    for line in text.splitlines():
        if line.startswith("| plain |"):  # the Structured output table's first row: plain renders again
            line = line.replace("| plain |", "| plain renders |", 1)
        cells = [c.strip().strip("*") for c in line.strip("|").split("|")]
        key = next((rows[label] for label in rows if cells[0].startswith(label)), None)
        if key is None or len(cells) != len(columns) + 1:
            continue
        for column, cell in zip(columns, cells[1:], strict=True):
            digits = 1 if column == "overall" else 0
            assert cell == f"{100 * recorded[key][column]:.{digits}f}%", (key, column, cell)
        checked.add(key)
    assert checked == set(recorded)
    seed = re.search(r"^EVAL_SEED = (\d+)", (REPO / "scripts" / "build_builtin_model.py").read_text(), re.M)
    built_in = (b for b in BLOCKS if b.section == "The built-in model")
    eval_lines = [c for b in built_in for c in commands(b.text) if c[0] == "eval"]
    assert len(eval_lines) == 4 and all(c[1:3] == ["--seed", seed[1]] for c in eval_lines)
