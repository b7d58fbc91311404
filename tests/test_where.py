"""`where` filters: parsed into an allow-listed tree and evaluated without eval/query.

The accepted expressions give what pandas' own ``query`` gives on the same frame; hostile text
(the payloads that ran commands through the old string checker, and thousands generated from
quotes, backticks, attributes, dunders, calls, subscripts, f-strings and look-alike characters)
is refused or evaluated as a plain filter, and nothing outside the grammar ever runs.
"""

from __future__ import annotations

import builtins
import os
import random
import subprocess
import time

import numpy as np
import pandas as pd
import pytest

from curation import where
from curation.where import WhereError, columns_of, parse, walk, where_mask


@pytest.fixture(scope="module")
def frame():
    rng = np.random.default_rng(3)
    n = 200
    labels = np.array(["cat", "dog", "bird", None, "Cat's", 'say "hi"'], dtype=object)[rng.integers(0, 6, n)]
    return pd.DataFrame({
        "label": labels,
        "brightness": rng.random(n),
        "width": rng.integers(8, 512, n),
        "height": rng.integers(8, 512, n),
        "captured_at": rng.integers(0, 100, n).astype(np.int64),
        "is_junk": rng.random(n) < 0.2,
        "site name": np.array(["a", "b"], dtype=object)[rng.integers(0, 2, n)],
    })


# Expressions users write today (README, tests, configs): same rows as pandas' query.
ACCEPTED = [
    "label == 'cat'",
    "label != 'cat'",
    "label == 'cat' and width >= 256",
    "label == \"dog\" or brightness < 0.25",
    "not is_junk",
    "~is_junk & (width > 100)",
    "is_junk | (height <= 40)",
    "width * height > 65536",
    "width / height >= 1.5",
    "(width - height) % 2 == 0",
    "-width < -300",
    "10 < width < 300",
    "label in ['cat', 'dog']",
    "label not in ('cat', 'dog')",
    "`site name` == 'a' and captured_at >= 50",
    "`brightness` > 0.1",
    "captured_at >= 0",
    "label == 'Cat\\'s'",
    "label == 'say \"hi\"'",
    "brightness > 1e-1 and brightness < .9",
    "width >= 10 and not (label == 'bird' or label == 'cat')",
    "is_junk == True",
    "width // 100 == 2",
]
# Outside pandas' query: ours only (string and null tests as pandas Series methods).
METHODS = {
    "label.str.startswith('c')": lambda df: df["label"].str.startswith("c").fillna(False).astype(bool),
    "label.str.endswith('g')": lambda df: df["label"].str.endswith("g").fillna(False).astype(bool),
    "label.str.contains('a')": lambda df: df["label"].str.contains("a", na=False).astype(bool),
    "label.str.match('^[cd]')": lambda df: df["label"].str.match("^[cd]", na=False).astype(bool),
    "label.str.lower() == 'cat'": lambda df: (df["label"].str.lower() == "cat").fillna(False).astype(bool),
    "label.str.upper() == 'DOG'": lambda df: (df["label"].str.upper() == "DOG").fillna(False).astype(bool),
    "label.str.strip() == 'cat'": lambda df: (df["label"].str.strip() == "cat").fillna(False).astype(bool),
    "label.str.len() > 3": lambda df: (df["label"].str.len() > 3).fillna(False).astype(bool),
    "label.isna()": lambda df: df["label"].isna(),
    "label.notna() and width > 100": lambda df: df["label"].notna() & (df["width"] > 100),
    "label.isnull() or label.notnull()": lambda df: pd.Series(True, index=df.index),
}


@pytest.mark.parametrize("expression", ACCEPTED)
def test_accepted_expressions_select_what_pandas_query_selects(frame, expression):
    ours = where_mask(frame, expression)
    expected = frame.eval(expression).to_numpy(bool)
    assert ours.dtype == bool and len(ours) == len(frame)
    assert (ours == expected).all()
    assert 0 < ours.sum() < len(frame) or expression in ("captured_at >= 0",)


@pytest.mark.parametrize("expression", list(METHODS))
def test_string_and_null_tests(frame, expression):
    assert (where_mask(frame, expression) == METHODS[expression](frame).to_numpy(bool)).all()


PAYLOAD_FILE = "curation-where-pwned"


@pytest.mark.parametrize("expression", [
    # the issue's payload: a backtick inside a string literal fooled the old checker
    "label == '`' or label.to_csv.__globals__.get('sys').modules.get('os').system('touch "
    + PAYLOAD_FILE + "') == 0 or label == '`'",
    "label.to_csv('" + PAYLOAD_FILE + "')",
    "__import__('os').system('touch " + PAYLOAD_FILE + "')",
    "@pd.io.common.os.system('touch " + PAYLOAD_FILE + "')",
    "label.str.cat.__globals__['os'].system('touch " + PAYLOAD_FILE + "')",
    "`label.to_csv('" + PAYLOAD_FILE + "')`",  # a backticked name is only ever a column name
    "label.str.startswith('a', __import__('os').system('touch " + PAYLOAD_FILE + "'))",
    "(lambda: __import__('os').system('touch " + PAYLOAD_FILE + "'))()",
    "label == f'{__import__(\"os\").system(\"touch " + PAYLOAD_FILE + "\")}'",
    "[x for x in ().__class__.__base__.__subclasses__()]",
    "label[0] == 'c'",
    "label.values",
    "label.str.len",
    "label == 'a' ; import os",
])
def test_code_in_where_is_refused_and_never_runs(frame, expression, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(WhereError):
        where_mask(frame, expression)
    assert not (tmp_path / PAYLOAD_FILE).exists()


def test_the_issue_payload_is_refused_by_a_selection_and_by_similar(tmp_path, monkeypatch):
    from curation.config import ConfigError, SelectionConfig
    from curation.select import evaluate_where

    monkeypatch.chdir(tmp_path)
    payload = ("label == '`' or label.to_csv.__globals__.get('sys').modules.get('os').system('touch "
               + PAYLOAD_FILE + "') == 0 or label == '`'")
    df = pd.DataFrame({"label": ["a", "`"]})
    with pytest.raises(ConfigError, match="where"):
        evaluate_where(df, SelectionConfig(name="s", mode="clean", where=payload))
    assert not (tmp_path / PAYLOAD_FILE).exists()


def test_errors_say_where_the_expression_leaves_the_grammar(frame):
    with pytest.raises(WhereError, match=r"'\.to_csv' is not allowed"):
        where_mask(frame, "label.to_csv('x')")
    with pytest.raises(WhereError, match="no column 'lable'"):
        where_mask(frame, "lable == 'cat'")
    with pytest.raises(WhereError, match="character 9"):
        where_mask(frame, "label == $x")
    with pytest.raises(WhereError, match="not a true/false condition"):
        where_mask(frame, "width + 1")
    with pytest.raises(WhereError, match="nested deeper"):
        where_mask(frame, "(" * 500 + "is_junk" + ")" * 500)
    with pytest.raises(WhereError, match="longer than"):
        where_mask(frame, "is_junk or " * 1000 + "is_junk")


def test_columns_of_names_backticked_and_bare_columns_but_not_string_contents():
    assert columns_of("`site name` == 'a' and width > 'height'") == {"site name", "width"}
    assert columns_of("label.str.startswith('x')") == {"label"}
    assert columns_of("label.to_csv('x')") == set()


# ------------------------------------------------------------------------------------ the fuzz

FRAGMENTS = [
    "label", "width", "brightness", "is_junk", "`site name`", "`label`", "`a`b`", "__class__", "__globals__",
    "__import__", "__builtins__", "os", "sys", "system", "eval", "exec", "open", "getattr", "lambda", "import",
    "to_csv", "str", "startswith", "isna", "values", "iloc", "apply", "pipe", "@pd", "@os", "'", '"', "`",
    "'a'", '"b"', "'`'", "'\\''", "f'", "f'{1}'", "rb'x'", "'''", "(", ")", "[", "]", "{", "}", ",", ".", ":",
    ";", "=", "==", "!=", "<", ">=", "+", "-", "*", "**", "/", "//", "%", "&", "|", "~", "^", "@", "!", "?",
    "and", "or", "not", "in", "is", "if", "else", "for", "True", "None", "1", "0.5", "1e309", "-1", "0x10",
    "1_000", "ｌａｂｅｌ", "lаbel", "\u200b", "\\", "\\n", "#", "$", "...", ":=", "->", "yield", "await",
]
SENTINELS = ("eval", "exec", "compile")


def _generated(rng: random.Random, count: int) -> list[str]:
    out = []
    for _ in range(count):
        n = rng.randint(1, 12)
        out.append(" ".join(rng.choice(FRAGMENTS) for _ in range(n)) if rng.random() < 0.5
                   else "".join(rng.choice(FRAGMENTS) for _ in range(n)))
    return out


def _mutated(rng: random.Random, count: int) -> list[str]:
    """Accepted expressions with fragments spliced in at random places: near misses."""
    out = []
    for _ in range(count):
        text = rng.choice(ACCEPTED + list(METHODS))
        for _ in range(rng.randint(1, 3)):
            at = rng.randint(0, len(text))
            text = text[:at] + rng.choice(FRAGMENTS) + text[at:]
        out.append(text)
    return out


def test_fuzz_nothing_outside_the_grammar_evaluates(frame, tmp_path, monkeypatch):
    """Thousands of generated expressions: each is refused with a WhereError or is a tree of
    allowed nodes evaluated to a mask; no eval/exec/compile, pandas eval/query, shell or file
    write is reached on the way."""
    calls = []

    def trap(name):
        def called(*args, **kwargs):
            calls.append(name)
            raise AssertionError(f"{name} reached from a where expression")
        return called

    monkeypatch.chdir(tmp_path)
    for name in SENTINELS:
        monkeypatch.setattr(builtins, name, trap(name))
    monkeypatch.setattr(pd, "eval", trap("pd.eval"))
    monkeypatch.setattr(pd.DataFrame, "eval", trap("DataFrame.eval"))
    monkeypatch.setattr(pd.DataFrame, "query", trap("DataFrame.query"))
    monkeypatch.setattr(pd.Series, "to_csv", trap("Series.to_csv"))
    monkeypatch.setattr(os, "system", trap("os.system"))
    monkeypatch.setattr(os, "popen", trap("os.popen"))
    monkeypatch.setattr(subprocess, "Popen", trap("subprocess.Popen"))
    rng = random.Random(20261207)
    expressions = (_generated(rng, 6000) + _mutated(rng, 4000)
                   + [a + " and " + b for a, b in zip(_generated(rng, 500), ACCEPTED * 30)])
    started = time.perf_counter()
    accepted, wrong = 0, []
    for expression in expressions:
        try:
            tree = parse(expression)
        except WhereError:
            continue
        except Exception as exc:  # anything else escaping is a bug
            wrong.append((expression, repr(exc)))
            continue
        for node in walk(tree):
            if not isinstance(node, where.NODES):
                wrong.append((expression, f"node {node!r}"))
            if isinstance(node, where.Call) and not (
                    (node.method in where.NULL_METHODS or node.method[4:] in where.STR_METHODS)
                    and all(isinstance(a, str) for a in node.args)):
                wrong.append((expression, f"call {node!r}"))
            if isinstance(node, where.Literal) and not (node.value is None
                                                        or type(node.value) in (bool, int, float, str)):
                wrong.append((expression, f"literal {node!r}"))
        try:
            mask = where_mask(frame, expression)
        except WhereError:
            continue
        except Exception as exc:
            wrong.append((expression, repr(exc)))
            continue
        accepted += 1
        if not (mask.dtype == bool and mask.shape == (len(frame),)):
            wrong.append((expression, f"mask {mask.dtype} {mask.shape}"))
    elapsed = time.perf_counter() - started
    monkeypatch.undo()  # pytest's own reporting compiles
    assert wrong == []
    assert calls == []
    assert list(tmp_path.iterdir()) == []
    assert accepted > 100  # the generator does reach the evaluator
    assert elapsed < 10
