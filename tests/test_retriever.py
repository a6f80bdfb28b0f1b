"""The Python API of retrieval (helpers.evaluation.retriever) and its onnxruntime path: an index
embedded with the ONNX export ranks every test query as the PyTorch index does, index.json says
which runtime embedded it, and the README's example runs as written."""

from __future__ import annotations

import io
import json
import re
from contextlib import redirect_stderr, redirect_stdout

import pytest
from app_support import fixture_index

from helpers.apps import app, cli
from helpers.apps.cli import main
from helpers.core import config
from helpers.core.config import REPO_ROOT
from helpers.core.errors import InputError
from helpers.core.files import sha256_file
from helpers.evaluation import gallery
from helpers.evaluation.retriever import Retriever
from helpers.experiments import artifacts
from helpers.modeling.onnx_embedder import sidecar_path


@pytest.fixture(scope="module")
def fixture_data():
    return artifacts.ensure_prepared(config.get_config("fixture"), progress=False)


@pytest.fixture(scope="module")
def torch_index(tmp_path_factory):
    return fixture_index(tmp_path_factory)


@pytest.fixture(scope="module")
def onnx_index(torch_index, fixture_data):
    root, table = fixture_data
    out = torch_index.parent / "onnx_index"
    if not out.exists():
        checkpoint = torch_index.parent / "run" / "best.pt"
        argv = ["index", "--checkpoint", str(checkpoint), "--table", str(table), "--data-root", str(root)]
        with redirect_stdout(io.StringIO()):
            assert main([*argv, "--out", str(out), "--runtime", "onnx", "--quiet"]) == 0
    return out


def _queries(index_dir, table):
    """Every consumer photo of the test split whose item is in the gallery (the app's test queries)."""
    rows = app.listed_queries(table, "test", Retriever.load(index_dir).gallery, limit=10**6)
    assert len(rows) > 5
    return rows


def _top5(retriever: Retriever, root, rows) -> list[list[str]]:
    return [
        [hit["path"] for hit in retriever.search(root / r.path, box=(r.x_1, r.y_1, r.x_2, r.y_2), k=5)]
        for r in rows.itertuples(index=False)
    ]


def test_the_onnx_index_ranks_every_test_query_as_the_torch_index(torch_index, onnx_index, fixture_data):
    root, table = fixture_data
    rows = _queries(torch_index, table)
    expected = _top5(Retriever.load(torch_index), root, rows)
    assert _top5(Retriever.load(onnx_index, runtime="onnx"), root, rows) == expected
    assert _top5(Retriever.load(onnx_index), root, rows) == expected  # torch queries, onnx gallery


def test_index_json_records_the_runtime_and_the_onnx_file(torch_index, onnx_index):
    meta = json.loads((onnx_index / "index.json").read_text())
    assert meta["runtime"] == "onnx" and meta["onnx_sha256"] == sha256_file(onnx_index / gallery.ONNX_FILE)
    sidecar = json.loads(sidecar_path(onnx_index / gallery.ONNX_FILE).read_text())
    assert sidecar["checkpoint_sha256"] == meta["checkpoint_sha256"]
    assert json.loads((torch_index / "index.json").read_text())["runtime"] == "torch"
    assert not (torch_index / gallery.ONNX_FILE).exists()


def test_onnx_queries_need_an_onnx_model_of_the_same_checkpoint(torch_index, onnx_index, tmp_path):
    with pytest.raises(InputError, match="holds no ONNX model .* rebuild it with --runtime onnx"):
        Retriever.load(torch_index, runtime="onnx")
    export = onnx_index / gallery.ONNX_FILE  # an export of the torch index's checkpoint: accepted
    photo = next(iter(sorted(Retriever.load(torch_index).gallery.path)))
    root = Retriever.load(torch_index).index.meta["data_root"]
    hits = Retriever.load(torch_index, runtime="onnx", model=export).search(f"{root}/{photo}", k=3)
    assert hits[0]["path"] == photo
    other = tmp_path / "other.onnx"
    other.write_bytes(export.read_bytes())
    record = json.loads(sidecar_path(export).read_text())
    sidecar_path(other).write_text(json.dumps({**record, "checkpoint_sha256": "0" * 64}))
    with pytest.raises(InputError, match="other.onnx: exported from another checkpoint"):
        Retriever.load(torch_index, runtime="onnx", model=other)
    with pytest.raises(InputError, match="unknown runtime"):
        Retriever.load(torch_index, runtime="tensorrt")


def test_a_match_only_where_the_true_item_is_known(torch_index, fixture_data):
    root, table = fixture_data
    row = next(_queries(torch_index, table).itertuples(index=False))
    retriever = Retriever.load(torch_index)
    box = (row.x_1, row.y_1, row.x_2, row.y_2)
    unknown = retriever.search(root / row.path, box=box, k=len(retriever.gallery))
    assert all(set(hit) == {"rank", "score", "item_id", "path", "category"} for hit in unknown)
    known = retriever.search(root / row.path, box=box, k=len(retriever.gallery), true_item=row.item_id)
    assert [hit["match"] for hit in known] == [hit["item_id"] == row.item_id for hit in unknown]
    assert any(hit["match"] for hit in known)
    with pytest.raises(InputError, match="k must be"):
        retriever.search(root / row.path, k=0)


def test_search_on_the_cli_with_either_runtime(onnx_index, fixture_data):
    root, table = fixture_data
    row = next(_queries(onnx_index, table).itertuples(index=False))
    argv = [
        "search",
        "--index",
        str(onnx_index),
        str(root / row.path),
        "--box",
        f"{row.x_1},{row.y_1},{row.x_2},{row.y_2}",
    ]
    answers = {}
    for runtime in cli.RUNTIMES:
        stdout = io.StringIO()
        with redirect_stdout(stdout):
            assert main([*argv, "--json", "--runtime", runtime]) == 0
        answers[runtime] = json.loads(stdout.getvalue())
    direct = Retriever.load(onnx_index, runtime="onnx").search(
        root / row.path, box=(row.x_1, row.y_1, row.x_2, row.y_2)
    )
    assert [h["path"] for h in answers["onnx"]] == [h["path"] for h in answers["torch"]] == [h["path"] for h in direct]
    assert [h["score"] for h in answers["onnx"]] == pytest.approx([h["score"] for h in answers["torch"]], abs=1e-4)
    stderr = io.StringIO()
    with redirect_stderr(stderr), redirect_stdout(io.StringIO()):
        assert main([*argv, "--runtime", "tensorrt"]) == 2
    assert "invalid choice: 'tensorrt'" in stderr.getvalue()


def test_the_readme_example_runs(torch_index, fixture_data, capsys):
    root, table = fixture_data
    row = next(_queries(torch_index, table).itertuples(index=False))
    readme = (REPO_ROOT / "README.md").read_text()
    section = readme.split("## Python API", 1)[1]
    (block,) = re.findall(r"```python\n(.*?)```", section.split("\n## ", 1)[0], flags=re.S)
    for literal, value in (
        ('"outputs/demo/final_index"', repr(str(torch_index))),
        ('"street_photo.jpg"', repr(str(root / row.path))),
        ("(40, 30, 200, 260)", repr((row.x_1, row.y_1, row.x_2, row.y_2))),
    ):
        assert literal in block
        block = block.replace(literal, value)
    exec(compile(block, "README.md", "exec"), {})
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 5 and printed[0].startswith("1 id_")


def test_the_live_demo_searches_through_the_onnx_runtime(torch_index, onnx_index):
    torch_app, onnx_app = app.load_app(str(torch_index)), app.load_app(str(onnx_index), runtime="onnx")
    assert onnx_app.retriever.runtime == "onnx" and "queries embedded with onnx" in app.describe(onnx_app)
    label = torch_app.query_choices()[0]
    box = torch_app.query_example(label)[1]
    expected, got = torch_app.answer(query=label, box=box, k=5), onnx_app.answer(query=label, box=box, k=5)
    assert got.ok and [h["path"] for h in got.hits] == [h["path"] for h in expected.hits]
    assert [h["match"] for h in got.hits] == [h["match"] for h in expected.hits]
