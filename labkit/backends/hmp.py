"""HMP, QEMU's human monitor, on the model: ``human-monitor-command`` answers with QEMU's own text.

Lines are parsed as monitor/hmp.c parses them (a command name, then its arguments by their
``args_type`` from hmp-commands.hx: ``s`` a word or a "quoted string", ``S`` the rest of the line,
``M`` an expression in MiB, ``b`` on/off, ``-j`` a flag) with QEMU's messages for what it refuses
(``unexpected end of expression``, ``qom-set: string expected``, ``balloon: extraneous characters
at the end of line`` and ``Try "help balloon" for more information``). The commands call the QMP
commands of the monitor, as QEMU's hmp-cmds do, and print what QEMU prints (checked against
qemu-system-x86_64 7.2): ``info balloon``, ``balloon N`` (MiB), ``info memory-devices``, ``info
memdev``, ``qom-get PATH PROP``, ``qom-set PATH PROP VALUE`` (sizes with suffixes: ``4G``),
``info migrate``, ``info migrate_parameters``, ``info migrate_capabilities``,
``migrate_set_parameter``, ``migrate_set_capability``, ``info status`` and ``help``. Anything else
gets QEMU's ``unknown command: '...'``. Errors print as ``Error: <QEMU's text>``; lines end in
``\\r\\n``, as QEMU's monitor writes them.

>>> import labkit
>>> vm = labkit.open(memory="1G", seed=0, memhp_default_state="online_movable",
...                  virtio_mem=[{"id": "vm0", "size": "1G"}])
>>> hmp = lambda line: vm.qmp("human-monitor-command", **{"command-line": line})
>>> hmp("qom-set vm0 requested-size 256M")
''
>>> vm.advance(1000); print(hmp("info memory-devices").replace("\\r", ""), end="")
Memory device [virtio-mem]: "vm0"
  memaddr: 0x100000000
  node: 0
  requested-size: 268435456
  size: 268435456
  max-size: 1073741824
  block-size: 2097152
  memdev: /objects/mem-vm0
>>> hmp("balloon 2048x")
'balloon: extraneous characters at the end of line\\r\\nTry "help balloon" for more information\\r\\n'
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from labkit.backends.hmp_commands import (
    hmp_balloon,
    hmp_info_balloon,
    hmp_info_memdev,
    hmp_info_memory_devices,
    hmp_info_migrate,
    hmp_info_migrate_capabilities,
    hmp_info_migrate_parameters,
    hmp_info_status,
    hmp_migrate_set_capability,
    hmp_migrate_set_parameter,
    hmp_qom_get,
    hmp_qom_set,
)
from labkit.errors import QMPError
from labkit.units import MiB

_NUMBER = re.compile(r"0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*")  # strtoull(base 0)
_OPERATORS = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": lambda a, b: int(a / b),
              "%": operator.mod, "&": operator.and_, "|": operator.or_, "^": operator.xor}


class HmpSyntaxError(Exception):
    """The line does not parse; the text is QEMU's, the "Try help" line follows it."""


@dataclass(frozen=True)
class HmpCommand:
    """One HMP command: its ``args_type`` (hmp-commands.hx), its help line and its function
    (monitor, parsed arguments) -> text."""

    args_type: str
    params: str
    help: str
    run: Callable[[Any, dict], str]


# --- parsing (monitor/hmp.c) --------------------------------------------------------------------
class _Line:
    def __init__(self, text: str, pos: int = 0):
        self.text, self.pos = text, pos

    def skip_spaces(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def word(self) -> str:
        start = self.pos
        while self.pos < len(self.text) and not self.text[self.pos].isspace():
            self.pos += 1
        return self.text[start:self.pos]

    def string(self) -> str:
        """get_str: a "quoted string" with \\ escapes, or a word."""
        if self.peek() != '"':
            return self.word()
        out, self.pos = [], self.pos + 1
        escapes = {"n": "\n", "r": "\r", "\\": "\\", "'": "'", '"': '"'}
        while self.pos < len(self.text) and self.text[self.pos] != '"':
            c = self.text[self.pos]
            if c == "\\":
                self.pos += 1
                c = escapes.get(self.peek())
                if c is None:
                    raise HmpSyntaxError(f"unsupported escape code: '\\{self.peek()}'")
            out.append(c)
            self.pos += 1
        if self.peek() != '"':
            raise HmpSyntaxError("unterminated string")
        self.pos += 1
        return "".join(out)


def _expr(line: _Line) -> int:
    """get_expr: + - over * / % over & | ^ over unary + - ~ and (...), numbers as strtoull(0)."""
    def unary() -> int:
        line.skip_spaces()
        c = line.peek()
        if c in "+-~" and c:
            line.pos += 1
            value = unary()
            return value if c == "+" else (-value if c == "-" else ~value)
        if c == "(":
            line.pos += 1
            value = sum_()
            line.skip_spaces()
            if line.peek() != ")":
                raise HmpSyntaxError("')' expected")
            line.pos += 1
            return value
        if c == "":
            raise HmpSyntaxError("unexpected end of expression")
        number = _NUMBER.match(line.text, line.pos)
        if number is None:
            raise HmpSyntaxError(f"invalid char '{c}' in expression")
        line.pos = number.end()
        token = number.group()
        return int(token, 16) if token[1:2] in ("x", "X") else int(token, 8 if token[0] == "0" else 10)

    def binary(operand: Callable[[], int], ops: str) -> int:
        value = operand()
        while True:
            line.skip_spaces()
            op = line.peek()
            if not op or op not in ops:
                return value
            line.pos += 1
            right = operand()
            if op in "/%" and right == 0:
                raise HmpSyntaxError("division by zero")
            value = _OPERATORS[op](value, right)

    def logic() -> int:
        return binary(unary, "&|^")

    def prod() -> int:
        return binary(logic, "*/%")

    def sum_() -> int:
        return binary(prod, "+-")

    return sum_()


def parse_arguments(name: str, args_type: str, line: _Line) -> dict:
    """The arguments of ``name`` by its ``args_type``; HmpSyntaxError with QEMU's text."""
    out: dict[str, Any] = {}
    for spec in filter(None, args_type.split(",")):
        key, _, kind = spec.partition(":")
        optional = kind.endswith("?")
        kind = kind.rstrip("?")
        line.skip_spaces()
        if kind.startswith("-"):  # a flag such as -j
            out[key] = False
            if line.peek() == "-" and line.text[line.pos + 1:line.pos + 2] == kind[1]:
                out[key] = True
                line.pos += 2
            elif line.peek() == "-" and line.text[line.pos + 1:line.pos + 2].isalpha():
                raise HmpSyntaxError(f"{name}: unsupported option -{line.text[line.pos + 1]}")
            continue
        if line.peek() == "":
            if optional:
                continue
            if kind in ("s", "S"):
                raise HmpSyntaxError(f"{name}: string expected")
            if kind == "b":
                raise HmpSyntaxError("Expected 'on' or 'off'")
        if kind == "s":
            out[key] = line.string()
        elif kind == "S":
            out[key] = line.text[line.pos:]
            line.pos = len(line.text)
        elif kind == "M":
            value = _expr(line)
            if value < 0:
                raise HmpSyntaxError("enter a positive value")
            out[key] = value * MiB
        elif kind == "b":
            word = line.word()
            if word not in ("on", "off"):
                raise HmpSyntaxError("Expected 'on' or 'off'")
            out[key] = word == "on"
    line.skip_spaces()
    if line.peek():
        raise HmpSyntaxError(f"{name}: extraneous characters at the end of line")
    return out


def run_line(monitor: Any, text: str) -> str:
    """One HMP line, as ``human-monitor-command`` runs it: the output text, ``\\r\\n`` line ends."""
    return _crlf(_run(monitor, text))


def _crlf(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\n", "\r\n")


def _run(monitor: Any, text: str) -> str:
    line = _Line(text)
    line.skip_spaces()
    start = line.pos
    name = line.word()
    if not name:
        return ""
    table, full = COMMANDS, name
    command = table.get(ALIASES.get(name, name))
    if command is not None and command is INFO:
        line.skip_spaces()
        sub = line.word()
        if not sub:
            return help_text(INFO_COMMANDS, "info ")
        full, command = f"info {sub}", INFO_COMMANDS.get(sub)
        name = sub
    if command is None:
        return f"unknown command: '{text[start:line.pos]}'\n"
    try:
        args = parse_arguments(name, command.args_type, line)
    except HmpSyntaxError as e:
        return f'{e}\nTry "help {full}" for more information\n'
    try:
        return command.run(monitor, args)
    except QMPError as e:
        return f"Error: {e.desc}\n"


def help_text(table: dict, prefix: str = "") -> str:
    return "".join(f"{prefix}{name} {c.params} -- {c.help}\n" for name, c in sorted(table.items()))


def hmp_help(m: Any, args: dict) -> str:
    name = args.get("name")
    if not name:
        return help_text(COMMANDS)
    words = name.split()
    table, prefix = COMMANDS, ""
    if words[0] == "info" and len(words) > 1:
        table, prefix, words = INFO_COMMANDS, "info ", words[1:]
    elif words[0] == "info":
        return help_text(INFO_COMMANDS, "info ")
    command = table.get(ALIASES.get(words[0], words[0]))
    if command is None:
        return f"unknown command: '{name}'\n"
    return f"{prefix}{words[0]} {command.params} -- {command.help}\n"


INFO_COMMANDS = {
    "balloon": HmpCommand("", "", "show balloon information", hmp_info_balloon),
    "memdev": HmpCommand("", "", "show memory backends", hmp_info_memdev),
    "memory-devices": HmpCommand("", "", "show memory devices", hmp_info_memory_devices),
    "migrate": HmpCommand("", "", "show migration status", hmp_info_migrate),
    "migrate_capabilities": HmpCommand("", "", "show current migration capabilities",
                                       hmp_info_migrate_capabilities),
    "migrate_parameters": HmpCommand("", "", "show current migration parameters",
                                     hmp_info_migrate_parameters),
    "status": HmpCommand("", "", "show the current VM status (running|paused)", hmp_info_status),
}
INFO = HmpCommand("", "[subcommand]", "show various information about the system state", hmp_help)
COMMANDS = {
    "balloon": HmpCommand("value:M", "target", "request VM to change its memory allocation (in MB)",
                          hmp_balloon),
    "help|?": HmpCommand("name:S?", "[cmd]", "show the help", hmp_help),
    "info": INFO,
    "migrate_set_capability": HmpCommand("capability:s,state:b", "capability state",
                                         "Enable/Disable the usage of a capability for migration",
                                         hmp_migrate_set_capability),
    "migrate_set_parameter": HmpCommand("parameter:s,value:s", "parameter value",
                                        "Set the parameter for migration", hmp_migrate_set_parameter),
    "qom-get": HmpCommand("path:s,property:s", "path property", "print QOM property", hmp_qom_get),
    "qom-set": HmpCommand("json:-j,path:s,property:s,value:S", "[-j] path property value",
                          "set QOM property.\n\t\t\t-j: the value is specified in json format.", hmp_qom_set),
}
ALIASES = {"help": "help|?", "?": "help|?"}

__all__ = ["COMMANDS", "INFO_COMMANDS", "HmpCommand", "run_line"]
