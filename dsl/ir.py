"""The typed, immutable intermediate representation of a spec.

The parser builds these nodes from the Lark tree; `resolve` merges `extends` chains into flat models and
`validate` checks them. Every node keeps the position it came from so any later stage can point back at
the spec. Names in the IR are already checked identifiers; expressions are a closed set of node types,
so nothing here can carry arbitrary Python to the code generator.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field


class Node(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Pos(Node):
    file: str
    line: int
    column: int


class Comment(Node):
    file: str
    line: int
    column: int
    text: str
    own_line: bool  # a whole-line comment, rather than one after code


# ---- expressions -----------------------------------------------------------------------------------
class Name(Node):
    kind: Literal["name"] = "name"
    id: str
    pos: Pos


class Number(Node):
    kind: Literal["number"] = "number"
    value: int | float
    text: str
    pos: Pos


class String(Node):
    kind: Literal["string"] = "string"
    value: str
    pos: Pos


class Const(Node):
    """`true`, `false` or `none`."""

    kind: Literal["const"] = "const"
    value: bool | None
    pos: Pos


class Unary(Node):
    kind: Literal["unary"] = "unary"
    op: Literal["-", "not"]
    operand: Expr
    pos: Pos


class BinOp(Node):
    kind: Literal["binop"] = "binop"
    op: Literal[
        "+", "-", "*", "/", "//", "%", "**", "and", "or", "==", "!=", "<", "<=", ">", ">=", "in", "not in"
    ]
    left: Expr
    right: Expr
    pos: Pos


class IfExp(Node):
    kind: Literal["if"] = "if"
    test: Expr
    body: Expr
    orelse: Expr
    pos: Pos


class ListExpr(Node):
    kind: Literal["list"] = "list"
    items: tuple[Expr, ...]
    pos: Pos


class Subscript(Node):
    kind: Literal["subscript"] = "subscript"
    value: Expr
    index: Expr
    pos: Pos


class Comprehension(Node):
    """`[element for var in range(count)]`: the language's only loop, bounded by a config value."""

    kind: Literal["comprehension"] = "comprehension"
    element: Expr
    var: str
    count: Expr
    pos: Pos


class Call(Node):
    kind: Literal["call"] = "call"
    func: str
    args: tuple[Expr, ...]
    kwargs: tuple[tuple[str, Expr], ...]
    pos: Pos

    def kwarg(self, name: str) -> Expr | None:
        return next((value for key, value in self.kwargs if key == name), None)


Expr = Annotated[
    Union[Name, Number, String, Const, Unary, BinOp, IfExp, ListExpr, Subscript, Comprehension, Call],  # noqa: UP007
    Field(discriminator="kind"),
]


# ---- config schema ---------------------------------------------------------------------------------
class FieldType(Node):
    name: str  # int, float, bool, str, activation, rope, list, dict, any, enum
    optional: bool = False
    choices: tuple[str, ...] = ()  # for enums

    def __str__(self) -> str:
        base = f"enum({', '.join(self.choices)})" if self.name == "enum" else self.name
        return base + ("?" if self.optional else "")


class ConfigField(Node):
    name: str
    type: FieldType
    default: Expr | None  # None: required (no default)
    pos: Pos
    computed: bool = False  # `let`: derived from other fields, not a constructor argument, not serialised


class Alias(Node):
    """An HF `attribute_map` entry: `alias` reads and writes `target`."""

    alias: str
    target: str
    pos: Pos


class ConfigSchema(Node):
    fields: tuple[ConfigField, ...] = ()
    aliases: tuple[Alias, ...] = ()

    def field(self, name: str) -> ConfigField | None:
        return next((f for f in self.fields if f.name == name), None)


# ---- module tree and dataflow ----------------------------------------------------------------------
class Submodule(Node):
    """`name = Primitive(args)`, `name = BlockName` or `name = repeat(count, BlockName)`."""

    name: str
    kind: Literal["primitive", "block", "repeat"]
    target: str
    args: tuple[Expr, ...] = ()
    kwargs: tuple[tuple[str, Expr], ...] = ()
    count: Expr | None = None
    condition: Expr | None = None  # the submodule exists only when this config expression holds
    otherwise: Submodule | None = None  # ... else it is this one (same name): `A if cond else B`
    pos: Pos

    def choices(self) -> tuple[Submodule, ...]:
        """What this submodule may be built as: itself, and its `else` alternative."""
        return (self,) if self.otherwise is None else (self, self.otherwise)


class ArgumentOverride(Node):
    """`MLP.*_proj.bias = false`: one argument of every submodule of `block` whose name matches the glob
    `pattern` (`*` any run of characters, `[qkv]` one of these) or, when no submodule does, of every call to that
    function in the block's forward (`Attention.attend.causal = false`)."""

    block: str
    pattern: str
    argument: str
    value: Expr
    pos: Pos


class Parallel(Node):
    """`parallel gate_proj, up_proj: colwise`: how tensor parallelism splits these Linear submodules."""

    names: tuple[str, ...]
    style: str  # colwise, rowwise, gather (colwise with the output gathered), replicate
    pos: Pos


class GGUFRows(Node):
    """`Attention.q_proj: rows(-1, head_dim // 2, 2) -> (0, 2, 1)`: the file keeps these submodules' output
    rows in another order; viewed as `shape`, its axes taken in `order` give ours."""

    targets: tuple[tuple[str, str], ...]  # (block, submodule)
    shape: tuple[Expr, ...]
    order: tuple[int, ...]
    pos: Pos


class GGUFLayout(Node):
    """`gguf "llama" { ... }`: the llama.cpp architecture this model's GGUF files declare."""

    architecture: str
    rows: tuple[GGUFRows, ...] = ()
    pos: Pos


class StoredName(Node):
    """`stored DecoderLayer.mlp as "block_sparse_moe"`: older checkpoints keep `mlp` of every DecoderLayer
    under that name; loading renames their keys."""

    block: str
    name: str
    stored: str
    pos: Pos


class Tie(Node):
    """`tie lm_head = model.embed_tokens if tie_word_embeddings`: share the weight of two modules."""

    name: str
    target: tuple[str, ...]
    condition: Expr | None
    pos: Pos


class Assign(Node):
    kind: Literal["assign"] = "assign"
    targets: tuple[str, ...]
    value: Expr
    pos: Pos


class Return(Node):
    kind: Literal["return"] = "return"
    values: tuple[Expr, ...]
    pos: Pos


Stmt = Annotated[Union[Assign, Return], Field(discriminator="kind")]  # noqa: UP007


class Forward(Node):
    params: tuple[str, ...]
    body: tuple[Stmt, ...]
    pos: Pos

    def local_names(self) -> set[str]:
        """The parameters and every name a statement assigns."""
        return {*self.params, *(t for s in self.body if isinstance(s, Assign) for t in s.targets)}

    def expressions(self) -> list[Expr]:
        """The top-level expression of every statement, in order."""
        return [e for s in self.body for e in statement_exprs(s)]

    def calls(self) -> list[Call]:
        """Every call in the body, outermost first within each statement."""
        return [c for e in self.expressions() for c in calls_in(e)]

    def free_names(self) -> list[Name]:
        """Names the body reads that are not its locals: config values, options, `layer_idx`."""
        locals_ = self.local_names()
        return [n for e in self.expressions() for n in names_in(e) if n.id not in locals_]


class Block(Node):
    name: str
    role: Literal["block", "backbone", "head"]
    submodules: tuple[Submodule, ...] = ()
    forward: Forward | None = None
    ties: tuple[Tie, ...] = ()
    parallel: tuple[Parallel, ...] = ()
    attr: str | None = None  # backbone: its attribute in heads (`model`, `bert`); head: an override of it
    options: tuple[ConfigField, ...] = ()  # backbone: constructor options such as `add_pooling_layer`
    backbone_args: tuple[tuple[str, Expr], ...] = ()  # head: the options it builds its backbone with
    task: str | None = None  # head: causal_lm, sequence_classification, ...
    pos: Pos

    def submodule(self, name: str) -> Submodule | None:
        return next((s for s in self.submodules if s.name == name), None)


class Model(Node):
    """A model as written in one file: possibly a delta (`parent`) not yet merged."""

    name: str
    parent: str | None = None
    parent_pos: Pos | None = None
    model_type: str | None = None
    gguf: GGUFLayout | None = None  # not inherited: a delta is stored as another architecture, if at all
    stored_names: tuple[StoredName, ...] = ()  # inherited, and a delta's added
    config: ConfigSchema = ConfigSchema()
    # A delta's config items, kept apart from `config` until resolution.
    field_overrides: tuple[tuple[str, Expr, Pos], ...] = ()
    field_removals: tuple[tuple[str, Pos], ...] = ()
    field_lets: tuple[tuple[str, Pos], ...] = ()  # inherited fields made `let`s of their defaults
    blocks: tuple[Block, ...] = ()
    module_overrides: tuple[tuple[str, Submodule], ...] = ()  # (block name, submodule)
    forward_overrides: tuple[tuple[str, Forward], ...] = ()  # (block name, forward)
    argument_overrides: tuple[ArgumentOverride, ...] = ()
    head_removals: tuple[tuple[str, Pos], ...] = ()
    head_moves: tuple[tuple[str, str, Pos], ...] = ()  # (head, the attribute it keeps the backbone in)
    module_removals: tuple[tuple[str, str, Pos], ...] = ()  # (block name, submodule name)
    source_file: str
    pos: Pos

    def block(self, name: str) -> Block | None:
        return next((b for b in self.blocks if b.name == name), None)

    @property
    def type_name(self) -> str:
        """Its `model_type`: as declared, else its name in lower case (a delta does not inherit it)."""
        return self.model_type or self.name.lower()

    @property
    def backbone(self) -> Block | None:
        return next((b for b in self.blocks if b.role == "backbone"), None)

    @property
    def heads(self) -> tuple[Block, ...]:
        return tuple(b for b in self.blocks if b.role == "head")


class ResolvedModel(Node):
    """A validated model with its `extends` chain merged in, and the facts computed about it once
    (`dsl.analysis`): what the code generator consumes."""

    name: str
    model_type: str
    lineage: tuple[str, ...]  # this model first, then its ancestors
    config: ConfigSchema
    gguf: GGUFLayout | None = None
    stored_names: tuple[StoredName, ...] = ()
    blocks: tuple[Block, ...]
    source_files: tuple[str, ...]
    spec_hash: str
    pos: Pos
    comments: tuple[Comment, ...] = ()
    facts: Any = None  # dsl.analysis.Facts (frozen); typed loosely to keep the IR free of analysis

    def block(self, name: str) -> Block:
        return next(b for b in self.blocks if b.name == name)

    @property
    def type_name(self) -> str:
        return self.model_type

    @property
    def backbone(self) -> Block:
        return next(b for b in self.blocks if b.role == "backbone")

    @property
    def heads(self) -> tuple[Block, ...]:
        return tuple(b for b in self.blocks if b.role == "head")


# ---- traversal -------------------------------------------------------------------------------------
def children(expr: Expr) -> tuple[Expr, ...]:
    """The direct sub-expressions of `expr`."""
    if isinstance(expr, Unary):
        return (expr.operand,)
    if isinstance(expr, BinOp):
        return (expr.left, expr.right)
    if isinstance(expr, IfExp):
        return (expr.test, expr.body, expr.orelse)
    if isinstance(expr, ListExpr):
        return expr.items
    if isinstance(expr, Subscript):
        return (expr.value, expr.index)
    if isinstance(expr, Comprehension):
        return (expr.element, expr.count)
    if isinstance(expr, Call):
        return (*expr.args, *(v for _, v in expr.kwargs))
    return ()


def walk(expr: Expr) -> Iterator[Expr]:
    """Every node of an expression, itself first."""
    yield expr
    for child in children(expr):
        yield from walk(child)


def names_in(expr: Expr, bound: frozenset[str] = frozenset()) -> Iterator[Name]:
    """Every free `Name` an expression reads (call targets and comprehension variables excluded)."""
    if isinstance(expr, Name):
        if expr.id not in bound:
            yield expr
    elif isinstance(expr, Comprehension):
        yield from names_in(expr.count, bound)
        yield from names_in(expr.element, bound | {expr.var})
    else:
        for child in children(expr):
            yield from names_in(child, bound)


def calls_in(expr: Expr) -> list[Call]:
    return [n for n in walk(expr) if isinstance(n, Call)]


def statement_exprs(stmt: Stmt) -> tuple[Expr, ...]:
    return stmt.values if isinstance(stmt, Return) else (stmt.value,)


def map_calls(expr: Expr, change: Callable[[Call], Call]) -> Expr:
    """`expr` with every call node replaced by `change(call)`, innermost first."""
    updates: dict[str, object] = {}
    for key, value in expr:
        if isinstance(value, Node) and not isinstance(value, Pos):
            updates[key] = map_calls(value, change)  # type: ignore[arg-type]
        elif isinstance(value, tuple) and value and isinstance(value[0], tuple):  # Call.kwargs
            updates[key] = tuple((k, map_calls(v, change)) for k, v in value)
        elif isinstance(value, tuple):
            updates[key] = tuple(map_calls(v, change) for v in value)
    rebuilt = expr.model_copy(update=updates) if updates else expr
    return change(rebuilt) if isinstance(rebuilt, Call) else rebuilt


def same_expr(a: Expr, b: Expr) -> bool:
    """Structural equality, ignoring where the two were written."""

    def strip(node: object) -> object:
        if isinstance(node, Node):
            return tuple((k, strip(v)) for k, v in node if k != "pos")
        if isinstance(node, tuple):
            return tuple(strip(v) for v in node)
        return node

    return strip(a) == strip(b)


for _node in (
    Unary,
    BinOp,
    IfExp,
    ListExpr,
    Call,
    ConfigField,
    Submodule,
    Tie,
    Assign,
    Return,
    Forward,
    Model,
    ArgumentOverride,
):
    _node.model_rebuild()
