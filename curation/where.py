"""``where`` filters: parsed into an allow-listed tree, evaluated on the columns by this module.

The text is never handed to ``eval``, ``DataFrame.query`` or ``DataFrame.eval``: a small
tokenizer and recursive-descent parser build a tree of the nodes below, and :func:`evaluate`
walks it with pandas column operations. What is not in the grammar cannot run.

Grammar (pandas ``query`` style, so existing filters keep working)::

    expr       := or
    or         := and (("or" | "|") and)*
    and        := not (("and" | "&") not)*
    not        := ("not" | "~") not | comparison
    comparison := sum ((== | != | < | <= | > | >= | in | not in) sum)*     chained: a < b < c
    sum        := product (("+" | "-") product)*
    product    := unary (("*" | "/" | "//" | "%") unary)*
    unary      := ("-" | "+") unary | atom
    atom       := number | string | True | False | None | list | "(" expr ")" | column call?
    list       := "[" literals "]" | "(" literal "," literals? ")"
    column     := name | `any name in backticks`
    call       := ".isna()" | ".notna()" | ".isnull()" | ".notnull()"
                | ".str." (startswith | endswith | contains | match | lower | upper | strip | len)
                  "(" literals ")"

``&`` and ``|`` bind like ``and`` and ``or`` (as in pandas' ``query``). Strings are single- or
double-quoted with backslash escapes; names are ASCII identifiers (anything else goes in
backticks); a name is always a column, never a Python object.
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass

import numpy as np
import pandas as pd

MAX_LENGTH = 4096  # characters: a filter, not a program
MAX_DEPTH = 64  # nesting, so a hostile expression cannot exhaust the stack

STR_METHODS = ("startswith", "endswith", "contains", "match", "lower", "upper", "strip", "len")
NULL_METHODS = ("isna", "notna", "isnull", "notnull")
_STR_ARITY = {"startswith": 1, "endswith": 1, "contains": 1, "match": 1, "lower": 0, "upper": 0, "strip": 0, "len": 0}
COMPARISONS = {"==": operator.eq, "!=": operator.ne, "<": operator.lt, "<=": operator.le,
               ">": operator.gt, ">=": operator.ge}
ARITHMETIC = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv,
              "//": operator.floordiv, "%": operator.mod}
KEYWORDS = {"and", "or", "not", "in", "True", "False", "None"}


class WhereError(ValueError):
    """An expression outside the grammar, or one that cannot be evaluated on these columns."""


# ------------------------------------------------------------------------------------- the tree

@dataclass(frozen=True)
class Literal:
    value: object


@dataclass(frozen=True)
class LiteralList:
    values: tuple


@dataclass(frozen=True)
class Column:
    name: str


@dataclass(frozen=True)
class Call:
    column: Column
    method: str  # one of NULL_METHODS, or "str." + one of STR_METHODS
    args: tuple


@dataclass(frozen=True)
class Not:
    operand: object


@dataclass(frozen=True)
class Negate:
    operand: object


@dataclass(frozen=True)
class Logical:
    op: str  # "and" | "or"
    operands: tuple


@dataclass(frozen=True)
class Compare:
    op: str  # a key of COMPARISONS, "in" or "not in"
    left: object
    right: object


@dataclass(frozen=True)
class Arithmetic:
    op: str  # a key of ARITHMETIC
    left: object
    right: object


NODES = (Literal, LiteralList, Column, Call, Not, Negate, Logical, Compare, Arithmetic)


# ------------------------------------------------------------------------------------ tokenizer

_TOKEN = re.compile(r"""
    (?P<space>\s+)
  | (?P<number>(?:\d+\.\d*|\.\d+|\d+)(?:[eE][+-]?\d+)?)
  | (?P<string>'(?:[^'\\\n]|\\.)*'|"(?:[^"\\\n]|\\.)*")
  | (?P<quoted>`[^`\n]+`)
  | (?P<name>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<op>==|!=|<=|>=|//|[<>+\-*/%()\[\],.&|~])
""", re.VERBOSE | re.ASCII)
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", "'": "'", '"': '"', "0": "\0"}


def _unescape(body: str, at: int) -> str:
    out, i = [], 0
    while i < len(body):
        ch = body[i]
        if ch == "\\":
            nxt = body[i + 1]
            if nxt not in _ESCAPES:
                raise WhereError(f"unknown escape '\\{nxt}' in the string at character {at}")
            out.append(_ESCAPES[nxt])
            i += 2
        else:
            out.append(ch)
            i += 1
    return "".join(out)


def tokenize(text: str) -> list[tuple[str, object, int]]:
    """``(kind, value, position)`` tokens; kinds: number, string, name, keyword, op, end."""
    tokens, pos = [], 0
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if match is None:
            raise WhereError(f"unexpected {text[pos]!r} at character {pos}")
        kind, raw = match.lastgroup, match.group()
        if kind == "number":
            value = float(raw) if any(c in raw for c in ".eE") else int(raw)
            tokens.append(("number", value, pos))
        elif kind == "string":
            tokens.append(("string", _unescape(raw[1:-1], pos), pos))
        elif kind == "quoted":
            tokens.append(("name", raw[1:-1], pos))
        elif kind == "name":
            tokens.append(("keyword" if raw in KEYWORDS else "name", raw, pos))
        elif kind == "op":
            tokens.append(("op", raw, pos))
        pos = match.end()
    tokens.append(("end", None, len(text)))
    return tokens


# --------------------------------------------------------------------------------------- parser

class _Parser:
    def __init__(self, text: str):
        self.tokens = tokenize(text)
        self.i = 0
        self.depth = 0

    def peek(self, kind: str, value=None) -> bool:
        k, v, _ = self.tokens[self.i]
        return k == kind and (value is None or v == value)

    def take(self, kind: str, value=None):
        if not self.peek(kind, value):
            k, v, pos = self.tokens[self.i]
            wanted = repr(value) if value is not None else kind
            found = "the end" if k == "end" else repr(v)
            raise WhereError(f"expected {wanted} at character {pos}, found {found}")
        tok = self.tokens[self.i]
        self.i += 1
        return tok[1]

    def accept(self, kind: str, value=None) -> bool:
        if self.peek(kind, value):
            self.i += 1
            return True
        return False

    def nested(self):
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise WhereError(f"nested deeper than {MAX_DEPTH}")

    def parse(self):
        node = self.expr()
        self.take("end")
        return node

    def expr(self):
        self.nested()
        try:
            return self.or_()
        finally:
            self.depth -= 1

    def or_(self):
        operands = [self.and_()]
        while self.accept("keyword", "or") or self.accept("op", "|"):
            operands.append(self.and_())
        return operands[0] if len(operands) == 1 else Logical("or", tuple(operands))

    def and_(self):
        operands = [self.not_()]
        while self.accept("keyword", "and") or self.accept("op", "&"):
            operands.append(self.not_())
        return operands[0] if len(operands) == 1 else Logical("and", tuple(operands))

    def not_(self):
        if self.accept("keyword", "not") or self.accept("op", "~"):
            self.nested()
            try:
                return Not(self.not_())
            finally:
                self.depth -= 1
        return self.comparison()

    def comparison_op(self) -> str | None:
        k, v, _ = self.tokens[self.i]
        if k == "op" and v in COMPARISONS:
            self.i += 1
            return v
        if self.accept("keyword", "in"):
            return "in"
        if self.peek("keyword", "not") and self.tokens[self.i + 1][:2] == ("keyword", "in"):
            self.i += 2
            return "not in"
        return None

    def comparison(self):
        left = self.sum_()
        links = []
        while (op := self.comparison_op()) is not None:
            right = self.sum_()
            links.append(Compare(op, left, right))
            left = right
        if not links:
            return left
        return links[0] if len(links) == 1 else Logical("and", tuple(links))

    def sum_(self):
        node = self.product()
        while self.peek("op", "+") or self.peek("op", "-"):
            op = self.take("op")
            node = Arithmetic(op, node, self.product())
        return node

    def product(self):
        node = self.unary()
        while any(self.peek("op", o) for o in ("*", "/", "//", "%")):
            op = self.take("op")
            node = Arithmetic(op, node, self.unary())
        return node

    def unary(self):
        if self.peek("op", "-") or self.peek("op", "+"):
            sign = self.take("op")
            self.nested()
            try:
                operand = self.unary()
            finally:
                self.depth -= 1
            if isinstance(operand, Literal) and isinstance(operand.value, (int, float)) \
                    and not isinstance(operand.value, bool):
                return Literal(-operand.value if sign == "-" else operand.value)
            return Negate(operand) if sign == "-" else operand
        return self.atom()

    def literal(self):
        k, v, pos = self.tokens[self.i]
        if k in ("number", "string"):
            self.i += 1
            return v
        if k == "keyword" and v in ("True", "False", "None"):
            self.i += 1
            return {"True": True, "False": False, "None": None}[v]
        if k == "op" and v == "-" and self.tokens[self.i + 1][0] == "number":
            self.i += 2
            return -self.tokens[self.i - 1][1]
        raise WhereError(f"expected a literal at character {pos}, found {'the end' if k == 'end' else repr(v)}")

    def literal_list(self, close: str) -> tuple:
        values = []
        while not self.peek("op", close):
            values.append(self.literal())
            if not self.accept("op", ","):
                break
        self.take("op", close)
        return tuple(values)

    def atom(self):
        k, v, pos = self.tokens[self.i]
        if k in ("number", "string") or (k == "keyword" and v in ("True", "False", "None")):
            return Literal(self.literal())
        if self.accept("op", "["):
            return LiteralList(self.literal_list("]"))
        if self.accept("op", "("):
            # a parenthesised tuple of literals is a list; anything else is a grouped expression
            start = self.i
            if self.peek("op", ")"):
                self.i += 1
                return LiteralList(())
            try:
                first = self.literal()
                if self.accept("op", ","):
                    return LiteralList((first, *self.literal_list(")")))
            except WhereError:
                pass
            self.i = start
            node = self.expr()
            self.take("op", ")")
            return node
        if k == "name":
            self.i += 1
            return self.postfix(Column(v))
        raise WhereError(f"unexpected {'the end' if k == 'end' else repr(v)} at character {pos}")

    def postfix(self, column: Column):
        if not self.accept("op", "."):
            return column
        method = self.take("name")
        if method == "str":
            self.take("op", ".")
            name = self.take("name")
            if name not in STR_METHODS:
                raise WhereError(f"'.str.{name}' is not allowed (allowed: {', '.join(STR_METHODS)})")
            self.take("op", "(")
            args = self.literal_list(")")
            if len(args) != _STR_ARITY[name] or not all(isinstance(a, str) for a in args):
                raise WhereError(f"'.str.{name}' takes {_STR_ARITY[name]} string argument(s)")
            return Call(column, "str." + name, args)
        if method not in NULL_METHODS:
            raise WhereError(f"'.{method}' is not allowed (allowed: .{', .'.join(NULL_METHODS)}(), "
                             f".str.<{'|'.join(STR_METHODS)}>(...))")
        self.take("op", "(")
        self.take("op", ")")
        return Call(column, method, ())


def parse(text: str):
    """The tree of ``text``; :class:`WhereError` saying where it leaves the grammar."""
    if not isinstance(text, str) or not text.strip():
        raise WhereError("empty expression")
    if len(text) > MAX_LENGTH:
        raise WhereError(f"longer than {MAX_LENGTH} characters")
    return _Parser(text).parse()


def walk(node):
    """Every node of the tree, the root first."""
    yield node
    if isinstance(node, (Not, Negate)):
        yield from walk(node.operand)
    elif isinstance(node, Logical):
        for operand in node.operands:
            yield from walk(operand)
    elif isinstance(node, (Compare, Arithmetic)):
        yield from walk(node.left)
        yield from walk(node.right)
    elif isinstance(node, Call):
        yield node.column


def columns_of(text: str) -> set[str]:
    """The column names ``text`` reads (empty when it does not parse)."""
    try:
        tree = parse(text)
    except WhereError:
        return set()
    return {node.name for node in walk(tree) if isinstance(node, Column)}


# ------------------------------------------------------------------------------------ evaluator

def _value(node, df: pd.DataFrame):
    if isinstance(node, Literal):
        return node.value
    if isinstance(node, LiteralList):
        raise WhereError("a list is only allowed after 'in' / 'not in'")
    if isinstance(node, Column):
        if node.name not in df.columns:
            raise WhereError(f"no column {node.name!r} (columns: {', '.join(map(str, df.columns))})")
        return df[node.name]
    if isinstance(node, Call):
        series = _value(node.column, df)
        if node.method in ("isna", "isnull"):
            return series.isna()
        if node.method in ("notna", "notnull"):
            return series.notna()
        name = node.method[len("str."):]
        if not (pd.api.types.is_string_dtype(series) or pd.api.types.is_object_dtype(series) or series.empty):
            raise WhereError(f"'.str.{name}' needs a text column; {node.column.name!r} is {series.dtype}")
        accessor = series.astype(object).where(series.notna(), None).str
        if name in ("startswith", "endswith"):
            return getattr(accessor, name)(node.args[0]).fillna(False).astype(bool)
        if name in ("contains", "match"):
            try:
                re.compile(node.args[0])
            except re.error as exc:
                raise WhereError(f"'.str.{name}': not a regular expression ({exc})") from None
            return getattr(accessor, name)(node.args[0], na=False).astype(bool)
        return getattr(accessor, name)()
    if isinstance(node, Not):
        return ~_boolean(_value(node.operand, df), "not")
    if isinstance(node, Negate):
        return -_value(node.operand, df)
    if isinstance(node, Logical):
        values = [_boolean(_value(o, df), node.op) for o in node.operands]
        out = values[0]
        for value in values[1:]:
            out = (out & value) if node.op == "and" else (out | value)
        return out
    if isinstance(node, Compare):
        left = _value(node.left, df)
        if node.op in ("in", "not in"):
            if not isinstance(node.right, LiteralList):
                raise WhereError(f"'{node.op}' takes a list of literals, e.g. label in ['cat', 'dog']")
            if not isinstance(left, pd.Series):
                raise WhereError(f"'{node.op}' needs a column on its left")
            inside = left.isin(list(node.right.values))
            return inside if node.op == "in" else ~inside
        return COMPARISONS[node.op](left, _value(node.right, df))
    if isinstance(node, Arithmetic):
        return ARITHMETIC[node.op](_value(node.left, df), _value(node.right, df))
    raise WhereError(f"{type(node).__name__} is not part of the grammar")  # unreachable from parse()


def _boolean(value, op: str):
    if isinstance(value, pd.Series) and (value.dtype == bool or str(value.dtype).startswith("bool")):
        return value.fillna(False).astype(bool) if value.dtype != bool else value
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise WhereError(f"'{op}' needs true/false conditions on both sides")


def evaluate(tree, df: pd.DataFrame) -> np.ndarray:
    """A parsed expression over ``df`` as a boolean mask of its rows."""
    try:
        with np.errstate(all="ignore"):
            mask = _value(tree, df)
    except WhereError:
        raise
    except (TypeError, ValueError, ArithmeticError) as exc:  # e.g. a text column compared with a number
        raise WhereError(f"cannot evaluate ({type(exc).__name__}: {exc})") from None
    if not isinstance(mask, pd.Series) or not (mask.dtype == bool or str(mask.dtype).startswith("bool")):
        raise WhereError("not a true/false condition over the columns")
    return mask.fillna(False).to_numpy(bool)


def where_mask(df: pd.DataFrame, expression: str) -> np.ndarray:
    """``expression`` over ``df`` as a boolean mask (:class:`WhereError`, a ``ValueError``, saying why not)."""
    try:
        return evaluate(parse(expression), df)
    except WhereError as exc:
        raise WhereError(f"cannot evaluate {expression!r} ({exc})") from None
