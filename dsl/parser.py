"""Spec text -> IR `Model` nodes. Only `SpecError` ever escapes from here."""

from __future__ import annotations

import keyword
import re
from functools import cache
from importlib import resources

from lark import Lark, Token, Transformer, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken, VisitError

from . import ir
from .errors import SpecError
from .library import RESERVED

_TOKEN_NAMES = {
    "NAME": "a name",
    "NUMBER": "a number",
    "STRING": "a string",
    "LBRACE": "`{`",
    "RBRACE": "`}`",
    "LPAR": "`(`",
    "RPAR": "`)`",
    "EQUAL": "`=`",
    "COLON": "`:`",
    "COMMA": "`,`",
    "DOT": "`.`",
    "LSQB": "`[`",
    "RSQB": "`]`",
    "MINUS": "`-`",
    "QMARK": "`?`",
    "ADD_OP": "`+`",
    "MUL_OP": "`*`",
    "COMP_OP": "a comparison",
    "POW": "`**`",
    "$END": "end of file",
}


@cache
def _lark() -> Lark:
    grammar = resources.files(__package__).joinpath("grammar.lark").read_text()
    return Lark(grammar, parser="lalr", lexer="contextual", propagate_positions=True, maybe_placeholders=True)


def check_identifier(name: str, pos: ir.Pos) -> str:
    """Reject names that would mean something else once written into Python."""
    if keyword.iskeyword(name) or keyword.issoftkeyword(name):
        raise SpecError(f"`{name}` is a Python keyword and cannot be used as a name", pos)
    if name.startswith("__") or name.startswith("_"):
        raise SpecError(f"`{name}`: names may not start with an underscore", pos)
    if name in RESERVED:
        raise SpecError(f"`{name}` is reserved and cannot be used as a name", pos)
    return name


# Attributes every generated module already has (nn.Module's API and ours): a submodule may not shadow them.
MODULE_ATTRIBUTES: frozenset[str] = frozenset(
    {
        "config", "layer_idx", "training", "forward", "parameters", "buffers", "modules", "children",
        "state_dict", "load_state_dict", "to", "cuda", "cpu", "eval", "train", "apply", "half", "float",
        "double", "bfloat16", "type", "zero_grad", "register_buffer", "register_parameter", "register_module",
        "add_module", "get_submodule", "get_parameter", "get_buffer", "named_modules", "named_parameters",
        "named_buffers", "named_children", "requires_grad_", "extra_repr", "dtype", "device", "post_init",
        "tie_weights", "tied_weights", "save_pretrained", "from_pretrained", "from_gguf", "num_parameters",
        "generation_defaults", "load_tensors", "base_model_prefix", "config_class", "to_empty", "share_memory",
    }
)  # fmt: skip


def check_attribute(name: str, pos: ir.Pos) -> str:
    if keyword.iskeyword(name) or name.startswith("_"):
        return check_identifier(name, pos)
    if name in MODULE_ATTRIBUTES:
        raise SpecError(
            f"`{name}` is already an attribute of every module; choose another submodule name", pos
        )
    return name


def _describe(expected: set[str]) -> str:
    names = sorted({_TOKEN_NAMES.get(t, f"`{t.lower()}`" if t.isupper() else t) for t in expected})
    return ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")


MAX_NESTING = 200  # brackets inside brackets; real specs nest a handful deep
_BRACKETS = re.compile(r'"[^"\n]*"?|#[^\n]*|[(\[{]|[)\]}]')


def _check_nesting(text: str, file: str) -> None:
    """Refuse brackets nested past MAX_NESTING before the parser builds a tree that deep (its time and
    the transforms' recursion grow with depth). Strings and comments are skipped."""
    depth = 0
    for match in _BRACKETS.finditer(text):
        token = match.group()
        if token in "([{":
            depth += 1
            if depth > MAX_NESTING:
                line = text.count("\n", 0, match.start()) + 1
                column = match.start() - text.rfind("\n", 0, match.start())
                raise SpecError(
                    f"brackets nested more than {MAX_NESTING} deep",
                    ir.Pos(file=file, line=line, column=column),
                    text,
                )
        elif token in ")]}":
            depth = max(depth - 1, 0)


def parse(text: str, file: str = "<spec>") -> tuple[ir.Model, ...]:
    """Parse one spec file into (unresolved) models."""
    _check_nesting(text, file)
    try:
        tree = _lark().parse(text)
    except UnexpectedInput as err:
        raise _syntax_error(err, text, file) from None
    try:
        return _ToIR(file).transform(tree)
    except VisitError as err:
        if isinstance(err.orig_exc, SpecError):
            raise err.orig_exc.with_source({file: text}) from None
        if isinstance(err.orig_exc, RecursionError):
            raise SpecError(f"{file}: an expression is nested too deeply to parse") from None
        raise
    except SpecError as err:
        raise err.with_source({file: text}) from None
    except RecursionError:  # a chain of operators tens of thousands long: as deep as nesting
        raise SpecError(f"{file}: an expression is nested too deeply to parse") from None


def _syntax_error(err: UnexpectedInput, text: str, file: str) -> SpecError:
    line, column = max(err.line, 1), max(err.column, 1)
    at_end = isinstance(err, UnexpectedEOF) or (isinstance(err, UnexpectedToken) and err.token.type == "$END")
    if at_end:
        message = f"unexpected end of file; expected {_describe(set(err.expected))}"
        lines = text.splitlines() or [""]
        line, column = len(lines), len(lines[-1]) + 1
    elif isinstance(err, UnexpectedToken):
        message = f"unexpected `{err.token}`; expected {_describe(set(err.expected))}"
    elif isinstance(err, UnexpectedCharacters):
        message = f"unexpected character `{text[err.pos_in_stream]}`"
        if text[err.pos_in_stream] in "'\\":
            message += " (strings use double quotes and may not contain escapes)"
    else:  # pragma: no cover - lark has no other subclasses today
        message = str(err).splitlines()[0]
    return SpecError(message, ir.Pos(file=file, line=line, column=column), text)


@v_args(meta=True)
class _ExpressionsToIR(Transformer):
    """Builds expression and config nodes bottom-up. Positions come from Lark's propagated metadata."""

    def __init__(self, file: str) -> None:
        super().__init__()
        self.file = file

    def _pos(self, meta_or_token: object) -> ir.Pos:
        line = getattr(meta_or_token, "line", 1)
        column = getattr(meta_or_token, "column", 1)
        return ir.Pos(file=self.file, line=line, column=column)

    def _name(self, token: Token) -> str:
        return check_identifier(str(token), self._pos(token))

    # ---- expressions -----------------------------------------------------------------------------
    def name(self, meta, children):
        token = children[0]
        # `layer_idx` is the one reserved name an expression may read: the index of the layer being built.
        identifier = "layer_idx" if str(token) == "layer_idx" else self._name(token)
        return ir.Name(id=identifier, pos=self._pos(token))

    def number(self, meta, children):
        text = str(children[0])
        value: int | float = float(text) if any(c in text for c in ".eE") else int(text)
        return ir.Number(value=value, text=text, pos=self._pos(children[0]))

    def string(self, meta, children):
        return ir.String(value=str(children[0])[1:-1], pos=self._pos(children[0]))

    def true(self, meta, children):
        return ir.Const(value=True, pos=self._pos(meta))

    def false(self, meta, children):
        return ir.Const(value=False, pos=self._pos(meta))

    def none(self, meta, children):
        return ir.Const(value=None, pos=self._pos(meta))

    def subscript(self, meta, children):
        return ir.Subscript(value=children[0], index=children[1], pos=self._pos(meta))

    def comprehension(self, meta, children):
        element, var, count = children
        return ir.Comprehension(element=element, var=self._name(var), count=count, pos=self._pos(meta))

    def list(self, meta, children):
        return ir.ListExpr(items=tuple(c for c in children if c is not None), pos=self._pos(meta))

    def neg(self, meta, children):
        return ir.Unary(op="-", operand=children[0], pos=self._pos(meta))

    def not_op(self, meta, children):
        return ir.Unary(op="not", operand=children[0], pos=self._pos(meta))

    def binop(self, meta, children):
        left, op, right = children
        return ir.BinOp(op=str(op), left=left, right=right, pos=self._pos(op))

    def compare(self, meta, children):
        left, op, right = children
        return ir.BinOp(op=" ".join(str(op).split()), left=left, right=right, pos=self._pos(op))

    def pow(self, meta, children):
        return ir.BinOp(op="**", left=children[0], right=children[2], pos=self._pos(children[1]))

    def and_op(self, meta, children):
        return ir.BinOp(op="and", left=children[0], right=children[1], pos=self._pos(meta))

    def or_op(self, meta, children):
        return ir.BinOp(op="or", left=children[0], right=children[1], pos=self._pos(meta))

    def ternary(self, meta, children):
        body, test, orelse = children
        return ir.IfExp(test=test, body=body, orelse=orelse, pos=self._pos(meta))

    def kwarg(self, meta, children):
        return (self._name(children[0]), children[1])

    def args(self, meta, children):
        return list(children)

    def _split_args(self, args: list | None, pos: ir.Pos) -> tuple[tuple, tuple]:
        positional, keywords, seen = [], [], set()
        for arg in args or []:
            if isinstance(arg, tuple):
                if arg[0] in seen:
                    raise SpecError(f"argument `{arg[0]}` given twice", arg[1].pos)
                seen.add(arg[0])
                keywords.append(arg)
            elif keywords:
                raise SpecError("positional argument after a keyword argument", arg.pos)
            else:
                positional.append(arg)
        return tuple(positional), tuple(keywords)

    def call(self, meta, children):
        func, args = children
        pos = self._pos(func)
        positional, keywords = self._split_args(args, pos)
        return ir.Call(func=self._attribute(func), args=positional, kwargs=keywords, pos=pos)

    # ---- config ----------------------------------------------------------------------------------
    def named_type(self, meta, children):
        return ir.FieldType(name=str(children[0]), optional=len(children) > 1)

    def enum_type(self, meta, children):
        optional = bool(children) and isinstance(children[-1], Token) and children[-1].type == "OPTIONAL"
        names = [c for c in children if not (isinstance(c, Token) and c.type == "OPTIONAL")]
        return ir.FieldType(name="enum", optional=optional, choices=tuple(str(n) for n in names))

    def field_decl(self, meta, children):
        name, type_, default = children
        return ir.ConfigField(name=self._name(name), type=type_, default=default, pos=self._pos(name))

    def let_decl(self, meta, children):
        name, type_, value = children
        return ir.ConfigField(
            name=self._name(name), type=type_, default=value, pos=self._pos(name), computed=True
        )

    def field_override(self, meta, children):
        return ("override", self._name(children[0]), children[1], self._pos(children[0]))

    def let_fields(self, meta, children):
        return ("let_fields", [(self._name(c), self._pos(c)) for c in children])

    def field_remove(self, meta, children):
        return ("remove", [(self._name(c), self._pos(c)) for c in children])

    def alias(self, meta, children):
        alias, target = children
        return ir.Alias(alias=self._name(alias), target=self._name(target), pos=self._pos(alias))

    def config(self, meta, children):
        return ("config", children, self._pos(meta))

    def model_type(self, meta, children):
        return ("model_type", str(children[0])[1:-1], self._pos(meta))

    def gguf_target(self, meta, children):
        block, sub = children
        return (self._name(block), self._attribute(sub))

    def gguf_rows(self, meta, children):
        targets = tuple(c for c in children if isinstance(c, tuple))
        shape = tuple(c for c in children if not isinstance(c, tuple | Token))
        order = []
        for token in (c for c in children if isinstance(c, Token)):
            if not str(token).isdigit():
                raise SpecError(f"`{token}` is not an axis; expected an integer such as 0", self._pos(token))
            order.append(int(str(token)))
        return ir.GGUFRows(targets=targets, shape=shape, order=tuple(order), pos=self._pos(meta))

    def stored(self, meta, children):
        block, name, stored = children
        text = str(stored)[1:-1]
        if not text.isidentifier():
            raise SpecError(f"stored name {stored} is not an identifier", self._pos(stored))
        return ("stored", ir.StoredName(block=self._name(block), name=self._attribute(name), stored=text,
                                        pos=self._pos(block)))  # fmt: skip

    def gguf(self, meta, children):
        name, *rows = children
        rows = tuple(r for r in rows if r is not None)
        return ("gguf", ir.GGUFLayout(architecture=str(name)[1:-1], rows=rows, pos=self._pos(name)))


@v_args(meta=True)
class _ToIR(_ExpressionsToIR):
    """Builds blocks, overrides and models from the expressions below them."""

    # ---- blocks ----------------------------------------------------------------------------------
    def block_ref(self, meta, children):
        target = children[0]
        return ("block", str(target), (), (), None, self._pos(target))

    def primitive(self, meta, children):
        target, args = children
        pos = self._pos(target)
        positional, keywords = self._split_args(args, pos)
        return ("primitive", str(target), positional, keywords, None, pos)

    def repeat(self, meta, children):
        count, target = children
        return ("repeat", str(target), (), (), count, self._pos(target))

    def _submodule(
        self, name: Token, spec: tuple, condition: ir.Expr | None, otherwise: tuple | None = None
    ) -> ir.Submodule:
        kind, target, args, kwargs, count, pos = spec
        alternative = self._submodule(name, otherwise, None) if otherwise is not None else None
        return ir.Submodule(
            name=self._attribute(name),
            kind=kind,
            target=target,
            args=args,
            kwargs=kwargs,
            count=count,
            condition=condition,
            otherwise=alternative,
            pos=pos,
        )

    def _attribute(self, token: Token) -> str:
        """A submodule name: it only ever appears as `self.<name>`, so `self` or `LayerNorm` are fine,
        but names nn.Module already uses are not."""
        return check_attribute(str(token), self._pos(token))

    def submodule(self, meta, children):
        return self._submodule(*children)

    def dotted(self, meta, children):
        return tuple(self._attribute(c) for c in children)

    def parallel(self, meta, children):
        *names, style = children
        return ir.Parallel(
            names=tuple(self._attribute(n) for n in names), style=self._name(style), pos=self._pos(style)
        )

    def tie(self, meta, children):
        name, target, condition = children
        return ir.Tie(name=self._attribute(name), target=target, condition=condition, pos=self._pos(name))

    def assign(self, meta, children):
        *targets, value = children
        names = tuple(self._name(t) for t in targets)
        return ir.Assign(targets=names, value=value, pos=self._pos(meta))

    def return_stmt(self, meta, children):
        return ir.Return(values=tuple(children), pos=self._pos(meta))

    def forward(self, meta, children):
        params = [c for c in children if isinstance(c, Token)]
        body = [c for c in children if not isinstance(c, Token) and c is not None]
        return ir.Forward(params=tuple(self._name(p) for p in params), body=tuple(body), pos=self._pos(meta))

    def _block(self, meta, role: str, name: Token, items: list, **extra) -> ir.Block:
        submodules, ties, forwards, parallel = [], [], [], []
        seen: set[str] = set()
        for item in items:
            if isinstance(item, ir.Submodule):
                if item.name in seen:
                    raise SpecError(f"submodule `{item.name}` is declared twice in `{name}`", item.pos)
                seen.add(item.name)
                submodules.append(item)
            elif isinstance(item, ir.Tie):
                ties.append(item)
            elif isinstance(item, ir.Parallel):
                parallel.append(item)
            else:
                if forwards:
                    raise SpecError(f"`{name}` has two forwards", item.pos)
                forwards.append(item)
        return ir.Block(
            name=self._name(name),
            role=role,
            submodules=tuple(submodules),
            ties=tuple(ties),
            parallel=tuple(parallel),
            forward=forwards[0] if forwards else None,
            pos=self._pos(name),
            **extra,
        )

    def block(self, meta, children):
        return self._block(meta, "block", children[0], children[1:])

    def option(self, meta, children):
        name, type_, default = children
        return ir.ConfigField(name=self._name(name), type=type_, default=default, pos=self._pos(name))

    def options(self, meta, children):
        return tuple(children)

    def backbone(self, meta, children):
        name, attr, options, *items = children
        return self._block(meta, "backbone", name, items, attr=self._attribute(attr), options=options or ())

    def head_backbone(self, meta, children):
        attr, args = children
        positional, keywords = self._split_args(args, self._pos(attr))
        if positional:
            raise SpecError(
                "backbone options are given by name: `as bert(add_pooling_layer = false)`", self._pos(attr)
            )
        return self._attribute(attr), keywords

    def head(self, meta, children):
        name, task, backbone, *items = children
        attr, args = backbone if backbone is not None else (None, ())
        return self._block(meta, "head", name, items, task=str(task), attr=attr, backbone_args=args)

    def override_module(self, meta, children):
        block, name, spec, condition, otherwise = children
        return ("override_module", str(block), self._submodule(name, spec, condition, otherwise))

    def override_argument(self, meta, children):
        block, target, argument, value = children
        pattern = str(target) if target.type == "PATTERN" else self._attribute(target)
        override = ir.ArgumentOverride(
            block=self._name(block),
            pattern=pattern,
            argument=self._name(argument),
            value=value,
            pos=self._pos(target),
        )
        return ("override_argument", override)

    def move_head(self, meta, children):
        head, attr = children
        return ("move_head", self._name(head), self._attribute(attr), self._pos(head))

    def remove_module(self, meta, children):
        block, name = children
        return ("remove_module", str(block), str(name), self._pos(name))

    def override_forward(self, meta, children):
        return ("override_forward", str(children[0]), children[1])

    def remove_head(self, meta, children):
        return ("remove_head", str(children[0]), self._pos(children[0]))

    def extends(self, meta, children):
        return (str(children[0]), self._pos(children[0]))

    # ---- model -----------------------------------------------------------------------------------
    def model(self, meta, children):
        name, parent, *members = children
        fields: list[ir.ConfigField] = []
        aliases: list[ir.Alias] = []
        overrides, removals, blocks = [], [], []
        module_overrides, forward_overrides, head_removals = [], [], []
        module_removals, argument_overrides, head_moves, field_lets = [], [], [], []
        model_type = gguf = None
        stored_names: list[ir.StoredName] = []
        block_names: set[str] = set()
        field_names: set[str] = set()
        for member in members:
            if isinstance(member, ir.Block):
                if member.name in block_names:
                    raise SpecError(f"`{member.name}` is declared twice in model `{name}`", member.pos)
                block_names.add(member.name)
                blocks.append(member)
            elif member[0] == "model_type":
                model_type = member[1]
            elif member[0] == "gguf":
                if gguf is not None:
                    raise SpecError(f"model `{name}` declares `gguf` twice", member[1].pos)
                gguf = member[1]
            elif member[0] == "stored":
                stored_names.append(member[1])
            elif member[0] == "config":
                for item in member[1]:
                    if isinstance(item, ir.ConfigField):
                        if item.name in field_names:
                            raise SpecError(f"config field `{item.name}` is declared twice", item.pos)
                        field_names.add(item.name)
                        fields.append(item)
                    elif isinstance(item, ir.Alias):
                        aliases.append(item)
                    elif item[0] == "override":
                        overrides.append((item[1], item[2], item[3]))
                    elif item[0] == "let_fields":
                        field_lets.extend(item[1])
                    else:
                        removals.extend(item[1])
            elif member[0] == "override_module":
                module_overrides.append((member[1], member[2]))
            elif member[0] == "override_forward":
                forward_overrides.append((member[1], member[2]))
            elif member[0] == "override_argument":
                argument_overrides.append(member[1])
            elif member[0] == "move_head":
                head_moves.append(member[1:])
            elif member[0] == "remove_head":
                head_removals.append((member[1], member[2]))
            elif member[0] == "remove_module":
                module_removals.append((member[1], member[2], member[3]))
        return ir.Model(
            name=self._name(name),
            parent=parent[0] if parent else None,
            parent_pos=parent[1] if parent else None,
            model_type=model_type,
            gguf=gguf,
            stored_names=tuple(stored_names),
            config=ir.ConfigSchema(fields=tuple(fields), aliases=tuple(aliases)),
            field_overrides=tuple(overrides),
            field_removals=tuple(removals),
            field_lets=tuple(field_lets),
            blocks=tuple(blocks),
            module_overrides=tuple(module_overrides),
            forward_overrides=tuple(forward_overrides),
            argument_overrides=tuple(argument_overrides),
            head_removals=tuple(head_removals),
            head_moves=tuple(head_moves),
            module_removals=tuple(module_removals),
            source_file=self.file,
            pos=self._pos(name),
        )

    def start(self, meta, children):
        return tuple(children)
