"""What the planner produces: the generated module as data (classes, methods, parameters, statements).

Expressions inside statements are already spelled Python (`codegen.spelling`); everything around them
is structure, so that one emitter (`codegen.emit`) decides the text: layout, blank lines, imports.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Line:
    """One simple statement, or a comment when it starts with `#`."""

    text: str


@dataclass(frozen=True)
class Nested:
    """A compound statement: `if ...:` or `for ...:` and its body."""

    head: str
    body: tuple[Stmt, ...]


Stmt = Line | Nested


def comments(texts: list[str]) -> list[Stmt]:
    return [Line(f"# {text}") for text in texts]


@dataclass(frozen=True)
class Param:
    name: str
    annotation: str | None = None
    default: str | None = None

    def __str__(self) -> str:
        text = f"{self.name}: {self.annotation}" if self.annotation else self.name
        return f"{text} = {self.default}" if self.default is not None else text


@dataclass(frozen=True)
class Function:
    """A method; `self` is implicit."""

    name: str
    params: tuple[Param, ...]
    returns: str
    body: tuple[Stmt, ...]
    comments: tuple[str, ...] = ()  # written above the `def`
    decorators: tuple[str, ...] = ()
    expand: bool = False  # one parameter per line even when they would fit on one


@dataclass(frozen=True)
class Attribute:
    """A class attribute: `name: annotation = value`, or a table (`entries`) written one entry per line."""

    name: str
    annotation: str | None
    value: str | None = None
    entries: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Class:
    name: str
    base: str
    doc: str = ""  # a docstring literal, quotes included
    attributes: tuple[Attribute, ...] = ()
    methods: tuple[Function, ...] = ()


@dataclass
class ModulePlan:
    """One generated package: its configuration class and its modeling classes."""

    package: str
    doc: str
    config: Class
    classes: list[Class] = field(default_factory=list)
    exports: list[str] = field(default_factory=list)
    registrations: list[str] = field(default_factory=list)  # calls the package makes into the runtime
