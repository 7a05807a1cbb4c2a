"""Reading a plan like an engineer: tokens, clauses, and the role of every mention.

A plan's summary and steps are cut into tokens (words, code, paths), sentences and clauses, and
each token gets a **role**: ``modify`` (the plan changes it), ``depend`` (the plan uses, calls,
raises, wraps, extends, reads, tests or describes it) or ``none`` (it is context: the problem
statement, a workload, a command to run, something left alone). Matching then looks the tokens
up in the registry and the code index and keeps the role.

The rules are English grammar, not a list of any codebase's words:

- **Verbs decide.** A clause's verb has a class (``CHANGE``: add, fix, rename..., and any other
  verb in imperative position; ``USE``: use, call, wrap, raise, extend...; ``READ``:
  investigate, profile, compare...; ``DOC``: document, describe...; ``RUN``; ``KEEP``;
  ``EXPORT``; ``MOVE``; ``PASS``; ``VERSION``). Its object, and the prepositional phrases after
  it, get roles from a table (``ROLE_TABLE``): "Add X *to* Y" modifies Y, "fix X *with* Y"
  depends on Y, "move X *out of* Y" modifies X only, "export X *from* Y" modifies Y and depends
  on X, "keep X" / "leave X alone" / "do not change X" claim nothing.
- **Clauses decide scope.** Purpose, reason, condition, comparison and relative clauses ("so
  callers stop...", "because...", "which...", "like X does") are context. A statement with a
  subject ("X calls Y", "X is slow") describes the code as it is: context, except in the
  summary, where a subject is what the plan is about ("mergeHeaders overwrites Link headers").
  "X should ..." and a topic ("Tree: add max_depth") name what changes.
- **Heads decide reference.** A plain word names a concept only as the head of its noun phrase:
  "the table" may be the Table, "lookup table" and "table row" are not; a name followed by an
  artefact noun ("Panel examples", "TableSuite benchmarks") is about those artefacts.

Everything is deterministic string work bounded by the text's length.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Container
from dataclasses import dataclass, field
from functools import lru_cache

from tetherlab.cluster.core.engine.text import stem, words

MODIFY = "modify"
DEPEND = "depend"
NONE = "none"
# What a test or benchmark asserts: a dependency of a plan that changes nothing else (label rule:
# test-only plans depend on what they test), nothing in a plan that changes code.
TESTED = "tested"
# A place named before a reading verb ("In X, compare ..."): modify in a plan that changes code,
# depend in a read-only plan.
FRONTED_READ = "fronted_read"
# "for X" after a change: a name there is what the change is for ("Reuse one widget for `Live`"),
# plain words are a purpose ("for log levels").
FOR_NAME = "for_name"
# A name added somewhere ("Add X to Y"): relied on when the code already defines it, modified
# when it is a new member of something that exists.
ADDED = "added"

# --- tokens -----------------------------------------------------------------------------------

WORD, CODE, PATH, NUM, PUNCT, LITERAL, CMD = "word", "code", "path", "num", "punct", "literal", "cmd"

# File extensions that make "name.ext" a file rather than "module.member".
FILE_EXTENSIONS = frozenset({
    "py", "pyi", "ts", "tsx", "mts", "cts", "js", "jsx", "mjs", "cjs", "go", "rs", "md", "mdx", "rst", "txt",
    "json", "toml", "yaml", "yml", "ini", "cfg", "lock", "html", "htm", "css", "scss", "svg", "sh", "c", "h",
    "cc", "cpp", "hpp", "java", "kt", "rb", "php", "swift", "cs", "vue", "svelte", "sql", "proto", "xml",
    "gradle", "mod", "sum", "pem", "csv", "tsv", "env", "dockerfile", "ipynb",
})
# Commands written in backticks: running them touches nothing.
COMMANDS = frozenset({
    "pytest", "python", "python3", "npm", "pnpm", "yarn", "npx", "mypy", "vitest", "asv", "git", "make", "pip",
    "cargo", "go", "node", "bun", "tsc", "eslint", "ruff", "pre-commit", "tox", "nox", "uv", "poetry", "deno",
    "jest", "black", "isort", "flake8", "rustc", "docker", "curl",
})
_CODE_KEYWORDS = frozenset({"from", "import", "export", "const", "let", "var", "return", "def", "class", "async",
                            "await", "new", "if", "for", "while", "type", "interface", "function", "lambda"})

_TOKEN = re.compile(
    r"`(?P<tick>[^`\n]{1,300})`"
    r"|(?P<slashed>(?:\./)?[A-Za-z0-9_.@$*{}\[\]-]+(?:/[A-Za-z0-9_.@$*{}\[\]-]*)+)"
    # Identifiers, dotted names, hyphenated words and file names ("ssr-server.ts").
    r"|(?P<ident>[A-Za-z_$#][A-Za-z0-9_$]*(?:(?:\.|::|-)[A-Za-z0-9_$#*]+)*(?:'s|\u2019s|')?)"
    r"|(?P<num>[0-9][0-9.,]*[0-9]|[0-9]+)"
    r"|(?P<punct>\.\.\.|\u2026|\u2014|\u2013|->|=>|[.,;:!?()\[\]{}\"'=<>+*/|&-])",
)
_IDENT_CHAIN = re.compile(r"^[A-Za-z_$#][A-Za-z0-9_$]*(?:(?:\.|::)[A-Za-z_$#][A-Za-z0-9_$]*)*")
_ABBREV = re.compile(r"\b(e\.g|i\.e|etc|vs|cf|approx)\.", re.IGNORECASE)


@dataclass(eq=False, slots=True)
class Token:
    kind: str
    text: str  # words: as written; code: the identifier chain; path: the path
    low: str = ""  # lowercase surface (words)
    norm: tuple[str, ...] = ()  # normalised words, for phrase matching
    call: bool = False  # written as a call: name(...)
    ticked: bool = False  # written in backticks
    first: bool = False  # the first token of its sentence
    role: str = NONE
    head: bool = True  # the head of its noun phrase (not a modifier of a following noun)
    compound: bool = False  # preceded by a noun that modifies it ("lookup table")
    tail: bool = False  # after "for"/"when" in a title with no verb: not what changes
    derived: bool = False  # followed by a noun derived from it ("a RegexHighlighter subclass")
    verb: bool = False  # read as a verb
    topic: bool = False  # the topic before a colon ("Tree: add max_depth")
    next_artefact: bool = False  # followed by an artefact noun ("Panel examples")
    anaphor: bool = False  # "the table" after "a lookup table": the same thing again
    next_of: bool = False  # followed by "of": a part or quantity of something else ("the texts of X")
    possessive: bool = False  # written with "'s" ("the server lane's projection")
    generic: bool = False  # after a quantifier ("any exception", "each client")
    owned: bool = False  # after a possessive ("its renderable", "PyCharm's console"): a part of that
    next_classifier: bool = False  # followed by a classifier noun ("the Style class")
    hit: bool = False  # may name something (the matcher's test): neighbour flags are computed


_CODE_CHARS = re.compile(r"[._:$#]")


def looks_like_code(ident: str) -> bool:
    """Code-shaped: dotted, underscored, camelCase, ``$``/``#`` names. Prose words, capitalised
    sentence starts and acronyms ("JWT") are not."""
    if _CODE_CHARS.search(ident):
        return ident.strip("._:") != ""
    return not ident.isupper() and not ident[1:].islower() and ident[1:] != ident[1:].lower()


def is_path(s: str) -> bool:
    """A file or directory path: has a '/' (and a file extension, a trailing '/' or three
    segments), or is a file name with a known extension ("package.json")."""
    s = s.strip().rstrip(",;:.")
    if not s or " " in s or s.startswith(("http:", "https:", "file:", "vscode:")):
        return False
    if "/" in s:
        segs = [x for x in s.split("/") if x]
        if not segs:
            return False
        last = segs[-1]
        if "." in last and last.rsplit(".", 1)[-1].lower() in FILE_EXTENSIONS:
            return True
        # Directories: "src/ssr/serializer/", "examples/react/basic".
        return s.endswith("/") or len(segs) >= 3
    if "." not in s:
        return False
    if s.startswith("."):
        return len(s) > 2 and s.count(".") >= 2  # ".pre-commit-config.yaml"
    return s.rsplit(".", 1)[-1].lower() in FILE_EXTENSIONS


def _ticked(inner: str) -> Token:
    s = inner.strip()
    if not s:
        return Token(LITERAL, s)
    first = s.split()[0]
    if " " in s and (first in COMMANDS or first.endswith(("pytest", "vitest"))):
        return Token(CMD, s)
    if is_path(s):
        return Token(PATH, s.strip().rstrip(",;"), ticked=True)
    if first in _CODE_KEYWORDS and " " in s:
        return Token(LITERAL, s)
    m = _IDENT_CHAIN.match(s)
    if m is None:
        return Token(LITERAL, s)
    chain = m.group(0)
    call = s[m.end():].lstrip().startswith("(")
    return Token(CODE, chain, norm=tuple(words(chain)), call=call, ticked=True)


_NO_CHANGE = re.compile(r"\bno (?:code|source|runtime) changes?\b|\bno changes\b|\bdocs only\b|\bread-only\b",
                        re.IGNORECASE)
_FIRST_WORD = re.compile(r"^\W*(?:plan\s*:\s*)?([A-Za-z][A-Za-z-]*)", re.IGNORECASE)
_LEAD = re.compile(r"^\s*(?:#+\s*|[-*+]\s+|\d+[.)]\s+)+")


def tokenize(text: str) -> list[Token]:
    """Tokens of one text; markdown emphasis, headings and list markers are dropped first."""
    t = _strip_emphasis(text) if "**" in text else text
    t = _LEAD.sub("", t)
    if "." in t:
        t = _ABBREV.sub(lambda m: m.group(1).replace(".", ""), t)
    out: list[Token] = []
    append, classify = out.append, _classify
    newlines = "\n" in t
    pos = 0
    for m in _TOKEN.finditer(t):
        if newlines and "\n" in t[pos : m.start()]:
            append(Token(PUNCT, "\n"))
        pos = m.end()
        group = m.lastgroup
        value = m[group] if group else ""
        if group == "ident":
            kind, core, low, norm, call, possessive = classify(value, t[pos:pos + 1] == "(")
            append(Token(kind, core, low, norm, call, False, possessive=possessive))
        elif group == "punct":
            append(Token(PUNCT, value))
        elif group == "tick":
            tok = _ticked(value)
            if tok.kind == CODE and t[pos:pos + 1] == "(":
                tok.call = True
            out.append(tok)
        elif group == "slashed":
            if is_path(value):
                core = value.rstrip(".,;:")
                out.append(Token(PATH, core))
                if value[len(core):].startswith("."):
                    out.append(Token(PUNCT, "."))  # the sentence ends after the path
            else:
                # "before/after", "Progress.update/advance", "[ ] / [x]": alternatives, not a path.
                for j, part in enumerate(value.split("/")):
                    if j:
                        out.append(Token(PUNCT, "/"))
                    out.extend(tokenize(part) if part else [])
        else:
            out.append(Token(NUM, value, low=value, norm=(value,)))
    return _fold_calls(out)


def _strip_emphasis(text: str) -> str:
    # Only outside backticks: `__init__` must survive.
    parts = text.split("`")
    for i in range(0, len(parts), 2):
        parts[i] = parts[i].replace("**", " ")
    return "`".join(parts)


@lru_cache(maxsize=1 << 16)
def _classify(ident: str, paren: bool) -> tuple[str, str, str, tuple[str, ...], bool, bool]:
    """(kind, text, lowercase, words, call, possessive) of an identifier-like token. Memoised:
    plans reuse a small vocabulary, and this is the hot path of matching."""
    possessive = ident.endswith(("'s", "\u2019s"))
    core = ident[:-2] if possessive else ident.rstrip("'")
    if is_path(core):
        return PATH, core, "", (), False, possessive
    norm = tuple(words(core))
    if (looks_like_code(core) and "-" not in core) or (paren and not core.islower()) or (paren and "_" in core):
        return CODE, core, "", norm, paren, possessive
    if paren and core.islower() and len(core) > 1:
        return CODE, core, "", norm, True, possessive
    return WORD, core, core.lower(), norm, False, possessive


def _fold_calls(toks: list[Token]) -> list[Token]:
    """Drop the argument lists of calls ("Panel('x', title=...)"): code, not prose."""
    out: list[Token] = []
    i = 0
    while i < len(toks):
        tok = toks[i]
        out.append(tok)
        i += 1
        if tok.kind == CODE and tok.call and not tok.ticked and i < len(toks) and toks[i].text == "(":
            depth, j = 0, i
            while j < len(toks) and j - i < 80:
                if toks[j].text == "(":
                    depth += 1
                elif toks[j].text == ")":
                    depth -= 1
                    if depth == 0:
                        break
                j += 1
            i = j + 1 if depth == 0 else i
    return out


# --- lexicon ----------------------------------------------------------------------------------

CHANGE, USE, READ, DOC, RUN, KEEP, EXPORT, MOVE, PASS, VERSION, IMPORT, CREATE, TEST = (
    "change", "use", "read", "doc", "run", "keep", "export", "move", "pass", "version", "import", "create", "test")

_IRREGULAR = {
    "build": ("built",), "write": ("wrote", "written"), "make": ("made",), "keep": ("kept",), "leave": ("left",),
    "run": ("ran",), "split": (), "set": (), "put": (), "throw": ("threw", "thrown"), "rethrow": ("rethrown",),
    "take": ("took", "taken"), "give": ("gave", "given"), "get": ("got", "gotten"), "find": ("found",),
    "hide": ("hid", "hidden"), "show": ("shown",), "rewrite": ("rewrote", "rewritten"), "do": ("did", "done"),
    "break": ("broke", "broken"), "fall": ("fell", "fallen"), "read": (), "lead": ("led",), "bring": ("brought",),
    "choose": ("chose", "chosen"), "see": ("saw", "seen"), "undo": ("undid", "undone"), "redo": ("redid", "redone"),
    "override": ("overrode", "overridden"), "begin": ("began", "begun"), "hold": ("held",), "send": ("sent",),
    "spend": ("spent",), "rebuild": ("rebuilt",), "feed": ("fed",), "stick": ("stuck",), "win": ("won",),
}
_DOUBLE = frozenset({"emit", "omit", "commit", "submit", "admit", "refer", "prefer", "control", "compel", "rerun",
                     "debug", "rebut", "upgrade"})


def _forms(base: str) -> set[str]:
    out = {base, *_IRREGULAR.get(base, ())}
    if base.endswith(("s", "x", "z", "ch", "sh")):
        out.add(base + "es")
    elif base.endswith("y") and base[-2:-1] not in "aeiou":
        out.add(base[:-1] + "ies")
    else:
        out.add(base + "s")
    double = base in _DOUBLE or (
        len(base) <= 4 and len(base) >= 3 and base[-1] not in "aeiouwxy" and base[-2] in "aeiou"
        and base[-3] not in "aeiou")
    stemmed = base + base[-1] if double and base != "rerun" else base
    if base == "rerun":
        stemmed = "rerunn"
    if base.endswith("ie"):
        out.update({base[:-2] + "ying", base + "d"})
    elif base.endswith("e") and not base.endswith(("ee", "ye")):
        out.update({base[:-1] + "ing", base + "d"})
    elif base.endswith("y") and base[-2:-1] not in "aeiou":
        out.update({base + "ing", base[:-1] + "ied"})
    else:
        out.update({stemmed + "ing", stemmed + "ed"})
    return out


_VERBS: dict[str, tuple[str, ...]] = {
    CHANGE: (
        "add", "change", "fix", "refactor", "replace", "deprecate", "remove", "delete", "rename", "rewrite",
        "migrate", "update", "modify", "edit", "adjust", "patch", "tweak", "rework", "overhaul", "simplify",
        "harden", "optimize", "optimise", "speed", "improve", "tighten", "loosen", "relax", "extend", "redesign",
        "restructure", "reorganize", "reorganise", "merge", "convert", "port", "swap", "drop", "strip", "omit",
        "skip", "avoid", "prevent", "stop", "disable", "enable", "allow", "support", "accept", "reject", "handle",
        "honour", "honor", "respect", "normalise", "normalize", "escape", "encode", "decode", "cap", "limit",
        "clamp", "trim", "pad", "memoize", "memoise", "include", "exclude", "expose", "hide", "show",
        "warn", "detect", "guard", "validate", "sort", "dedupe", "deduplicate", "de-duplicate",
        "reformat", "annotate", "retry", "implement", "introduce", "register", "append", "insert", "set",
        "default", "let", "make", "mark", "reimplement", "inline", "consolidate", "unify", "retire", "tidy",
        "clean", "fold", "collapse", "flatten", "cache", "store", "pick", "choose", "switch",
        "toggle", "bail", "rethrow", "reraise", "re-raise", "wire", "plumb", "propagate", "restore", "reset",
        "clear", "delay", "defer", "debounce", "throttle", "coalesce", "batch", "compute", "recompute", "build",
        "rebuild", "render", "draw", "print", "format", "reduce", "shrink", "grow", "widen", "narrow", "align",
        "justify", "wrap", "unwrap", "split", "join", "brand", "surface", "give", "offer", "guarantee", "ensure",
        "treat", "tolerate", "ignore", "suppress", "silence", "log", "record", "note", "list", "count", "track",
        "accumulate", "remember", "forget", "reuse", "replay", "re-run", "rerun", "resolve", "parse", "serialize",
        "serialise", "deserialize", "stream", "flush", "buffer", "close", "open", "start", "finish", "complete",
        "abort", "cancel", "retain", "discard", "evict", "invalidate", "refresh", "reload", "preload", "load",
        "lazy-load", "write", "initialise", "initialize", "declare", "define",
        "type", "lint", "localize", "localise", "translate", "re-export", "precompute", "hash", "quantise",
        "quantize", "downgrade", "overlay", "emulate", "keep-alive", "shorten", "lengthen", "colour", "color",
        "style", "highlight", "animate", "configure", "parametrize", "parameterize", "gate", "route", "attach",
        "detach", "bind", "unbind", "queue", "schedule", "revert", "undo", "restrict", "permit", "forbid",
        "deny", "bump", "reject", "redirect", "rewire", "extract", "hoist", "share", "expand",
    ),
    USE: (
        "use", "call", "invoke", "consume", "rely", "depend", "subclass", "inherit", "await", "raise", "throw",
        "reuse", "leverage", "delegate", "query", "mirror", "follow", "read", "look", "fetch", "dispatch",
        "instantiate", "wrap", "extend", "implement", "reference", "require", "need", "yield", "return", "emit",
        "produce", "construct", "catch", "handle",
    ),
    READ: (
        "investigate", "debug", "trace", "profile", "benchmark", "measure", "time", "reproduce", "audit",
        "review", "examine", "analyse", "analyze", "explore", "study", "inspect", "verify", "confirm", "see",
        "find", "identify", "determine", "understand", "compare", "diagnose", "bisect", "observe", "survey",
        "evaluate", "assess", "figure", "check", "ensure",
    ),
    TEST: ("test", "cover", "exercise", "assert"),
    DOC: ("document", "describe", "explain", "mention", "clarify", "illustrate", "summarise", "summarize", "state"),
    RUN: ("run", "execute", "launch", "install", "tag", "publish", "release", "commit", "push", "post", "report",
          "ship", "deploy", "upload", "notify", "ask", "wait"),
    KEEP: ("keep", "preserve", "retain", "maintain", "leave", "stay", "remain"),
    EXPORT: ("export", "re-export", "reexport"),
    MOVE: ("move", "relocate"),
    PASS: ("pass", "thread", "forward", "hand"),
    VERSION: ("bump", "upgrade", "pin", "unpin", "vendor"),
    IMPORT: ("import",),
    CREATE: ("create", "generate", "scaffold"),
}
# The class of a verb: later entries win where a verb is listed twice (USE over CHANGE for
# "wrap", "extend", "implement" when they are participles, see _participle_class).
VERB_CLASS: dict[str, str] = {}
for _cls in (CHANGE, USE, READ, TEST, DOC, RUN, KEEP, EXPORT, MOVE, PASS, VERSION, IMPORT, CREATE):
    for _v in _VERBS[_cls]:
        for _f in _forms(_v):
            VERB_CLASS[_f] = _cls
# Past participles of the known verbs ("built", "defined", "wrapped"), not "speed" or "need".
PAST_FORMS: frozenset[str] = frozenset(
    f for cls in _VERBS for v in _VERBS[cls] for f in _forms(v)
    if f != v and (f.endswith("ed") or f in _IRREGULAR.get(v, ())) and not f.endswith("ing"))
# In imperative position these read as changes ("Wrap the handle...", "Extend the union type").
_IMPERATIVE_CHANGE = frozenset({"wrap", "extend", "implement", "reuse", "require", "read", "call", "need",
                                "check", "record", "track", "time", "report", "post", "note", "list"})
_IMPERATIVE_OVERRIDE = {"wrap": CHANGE, "extend": CHANGE, "implement": CHANGE, "track": CHANGE, "reuse": CHANGE}
# Participles and gerunds that always say "relies on" ("a class extending X", "wrapping a Syntax").
_USE_PARTICIPLES = frozenset({
    "using", "calling", "wrapping", "extending", "implementing", "subclassing", "inheriting", "reading",
    "raising", "throwing", "rethrowing", "following", "mirroring", "reusing", "invoking", "consuming",
    "delegating", "awaiting", "querying", "leveraging", "relying", "depending", "referencing", "atop",
})
_DOC_PARTICIPLES = frozenset({"covering", "describing", "documenting", "explaining", "showing", "listing"})

# Function words and friends: never nouns, so never heads of a compound.
DETERMINERS = frozenset({"a", "an", "the", "this", "that", "these", "those", "each", "every", "any", "some", "no",
                         "all", "both", "either", "neither", "its", "their", "our", "your", "his", "her", "my",
                         "another", "other", "such", "which", "whose", "what", "one", "two", "three", "several",
                         "many", "few", "more", "most", "less", "least", "same", "own", "only", "just", "also",
                         "much", "enough", "whole", "certain"})
PREPOSITIONS = frozenset({"in", "inside", "into", "within", "at", "to", "onto", "on", "from", "with", "without",
                          "via", "through", "by", "for", "of", "about", "around", "across", "against", "after",
                          "before", "over", "under", "between", "among", "per", "than", "like", "unlike", "as",
                          "since", "until", "till", "toward", "towards", "upon", "off", "out", "up", "down",
                          "behind", "beside", "besides", "beyond", "near", "next", "throughout", "along", "atop",
                          "except", "instead", "rather", "during", "below", "above"})
CONJUNCTIONS = frozenset({"and", "or", "but", "nor", "then", "so", "because", "when", "whenever", "while", "if",
                          "unless", "where", "which", "that", "who", "whose", "whether", "why", "how", "once",
                          "though", "although", "whereas", "plus", "yet"})
PRONOUNS = frozenset({"it", "they", "them", "we", "you", "i", "he", "she", "itself", "themselves", "there", "here",
                      "nothing", "something", "everything", "anything", "none", "someone", "everyone", "one",
                      "ones", "each", "this", "that", "these", "those", "which", "what", "whatever", "users",
                      "user", "callers", "caller"})
AUXILIARIES = frozenset({"is", "are", "was", "were", "be", "been", "being", "am", "has", "have", "had", "does", "do",
                         "did", "will", "would", "shall", "should", "can", "could", "may", "might", "must", "needs",
                         "cannot", "can't", "won't", "don't", "doesn't", "didn't", "isn't", "aren't", "wasn't",
                         "shouldn't", "mustn't", "needn't"})
_CHANGE_MODALS = frozenset({"should", "must", "shall", "needs", "need"})
MODALS = frozenset({"should", "must", "will", "would", "shall", "can", "could", "may", "might", "cannot", "needs",
                    "need"})
NEGATORS = frozenset({"not", "never", "no", "without", "don't", "doesn't", "didn't", "mustn't", "shouldn't",
                      "won't", "can't", "cannot", "isn't", "aren't", "nothing", "neither", "nor", "needn't"})
# Adverbs that may open an imperative ("Then add...") or sit inside a verb group.
ADVERBS = frozenset({"then", "also", "optionally", "first", "finally", "next", "please", "just", "only", "again",
                     "still", "already", "currently", "now", "always", "simply", "lazily", "silently", "directly",
                     "explicitly", "locally", "instead", "afterwards", "later", "today", "too", "even", "exactly",
                     "evenly", "once", "really", "never", "ever", "otherwise", "else", "here", "there", "maybe",
                     "perhaps", "quickly", "anyway", "further", "accordingly", "similarly", "likewise",
                     "separately", "together", "individually", "internally", "publicly", "consistently",
                     "correctly", "properly", "gracefully", "safely", "automatically", "manually", "in-place"})
# Common adjectives: they may precede a head noun without making a compound ("the default theme").
ADJECTIVES = frozenset({
    "new", "old", "default", "current", "existing", "same", "other", "whole", "full", "empty", "public", "private",
    "internal", "external", "global", "local", "shared", "main", "custom", "first", "last", "next", "previous",
    "single", "multiple", "several", "big", "small", "large", "long", "short", "wide", "narrow", "deep", "shallow",
    "high", "low", "fast", "slow", "simple", "complex", "common", "generic", "specific", "separate", "entire",
    "real", "actual", "final", "initial", "original", "proper", "correct", "wrong", "bad", "good",
    "better", "best", "worse", "broken", "missing", "extra", "optional", "required", "unknown", "known",
    "invalid", "valid", "stale", "fresh", "active", "inactive", "visible", "hidden", "underlying", "top-level",
    "built-in", "builtin", "standard", "plain", "raw", "normal", "special", "certain", "various", "related",
    "relevant", "unrelated", "legacy", "modern", "nested", "flat", "dynamic", "static", "async", "sync",
    "synchronous", "asynchronous", "user-provided", "third-party", "up-to-date", "out-of-date", "latest",
    "earliest", "newer", "older", "rich", "given", "corresponding", "respective", "native",
    "right", "left", "middle", "inner", "outer", "upper", "lower", "leading", "trailing", "different",
    "similar", "identical", "equal", "unchanged", "untouched", "intact", "consistent", "deterministic",
})
# Nouns that name an artefact *about* code: "Panel examples" are examples, not the Panel.
ARTEFACTS = frozenset({
    "example", "examples", "test", "tests", "testcase", "testcases", "case", "cases", "doc", "docs", "docstring",
    "docstrings", "documentation", "benchmark", "benchmarks", "bench", "fixture", "fixtures", "snapshot",
    "snapshots", "tutorial", "tutorials", "guide", "guides", "readme", "changelog", "issue", "issues", "suite",
    "suites", "demo", "demos", "spec", "specs", "report", "reports", "profile", "profiles", "workload", "sample",
    "samples", "screenshot", "screenshots", "jsdoc", "comment", "comments", "changeset", "entry", "entries",
    "template", "templates", "translation", "translations", "notebook", "notebooks", "workflow", "workflows",
})
# Nouns for a new thing built from the name before them: "a RegexHighlighter subclass" uses the
# RegexHighlighter, it does not change it.
DERIVED_NOUNS = frozenset({"subclass", "subclasses", "subtype", "subtypes", "wrapper", "wrappers", "adapter",
                           "adapters", "proxy", "proxies", "facade", "extension", "extensions", "variant",
                           "variants", "fork", "clone", "shim", "decorator", "mock", "mocks", "stub", "stubs",
                           "fake", "fakes", "double", "message", "messages"})
# Nouns that keep the reference of the name before them: "the Style class" is the Style.
CLASSIFIERS = frozenset({
    "class", "classes", "object", "objects", "instance", "instances", "method", "methods", "function", "functions",
    "type", "types", "interface", "interfaces", "module", "modules", "file", "files", "helper", "helpers",
    "constructor", "field", "fields", "property", "properties", "attribute", "attributes", "option", "options",
    "argument", "arguments", "parameter", "parameters", "param", "params", "signature", "call", "calls",
    "renderable", "renderables", "component", "components", "hook", "hooks", "api", "apis", "implementation",
    "logic", "code", "path", "paths", "branch", "branches", "decorator", "mixin", "protocol", "contract",
    "literal", "union", "enum", "constant", "constants", "variable", "variables", "key", "keys", "value",
    "values", "flag", "flags", "setting", "settings", "store", "stores", "wrapper", "wrappers", "factory",
    "plugin", "plugins", "handler", "handlers", "callback", "callbacks", "method's", "class's", "output",
    "result", "results", "layer", "package", "entry", "directory", "folder", "overload", "overloads", "generic",
    "generics", "alias", "aliases", "table", "tables", "map", "dict", "list", "array", "set", "cache",
})
# Words that open a labelled paragraph; the label sets how the text after it reads.
CONTEXT_LABELS = frozenset({"context", "problem", "background", "why", "observation", "observations", "reported",
                            "profile", "profiling", "repro", "reproduction", "measurements", "results",
                            "symptom", "symptoms", "motivation", "note", "notes", "issue", "bug", "cause",
                            "rationale", "today", "currently", "current", "behaviour", "behavior", "finding",
                            "findings", "root"})
CHECK_LABELS = frozenset({"verification", "verify", "tests", "test", "testing", "validation", "checks", "check",
                          "benchmarks", "benchmark", "qa", "manual", "ci"})
ACTION_LABELS = frozenset({"plan", "steps", "step", "changes", "change", "implementation", "goal", "goals", "fix",
                           "approach", "proposal", "solution", "todo", "task", "tasks", "design", "outline"})
# Subordinators: the clause they open is context of the kind named.
PURPOSE, REASON, COND, REL, COMPARE, EMBED, MAIN = "purpose", "reason", "cond", "rel", "compare", "embed", "main"
SUBORDINATORS = {
    "so": PURPOSE, "because": REASON, "since": REASON, "as": COMPARE, "when": COND, "whenever": COND,
    "while": COND, "if": COND, "unless": COND, "until": COND, "once": COND, "where": REL, "which": REL,
    "whose": REL, "who": REL, "like": COMPARE, "unlike": COMPARE, "why": EMBED, "how": EMBED, "whether": EMBED,
    "though": REASON, "although": REASON, "whereas": REASON, "than": COMPARE, "instead": COMPARE,
    "rather": COMPARE,
}
_LOCATIVE = frozenset({"in", "inside", "into", "within", "at", "throughout", "across", "under", "on"})
_INSTRUMENT = frozenset({"with", "using", "via", "through", "by", "from", "against", "around", "atop"})
_VALUE = frozenset({"as", "than", "like", "unlike", "instead", "except", "besides", "beyond", "after", "before",
                    "over", "about", "between", "among", "during", "per", "next", "near", "beside", "toward",
                    "towards", "until", "till", "along", "below", "above", "behind", "out", "off", "up", "down"})
# Verbs whose "to X" names where something goes (add X to Y); for others "to X" is a new value.
_TO_PLACE = frozenset({"make", "add", "append", "insert", "register", "attach", "export", "re-export", "move", "pass",
                       "thread", "forward", "hand", "apply", "extend", "write", "post", "migrate", "port", "wire",
                       "propagate", "bring", "expose", "plumb", "route", "mention", "link", "list", "document",
                       "note", "copy", "give", "offer", "send"})
_REMOVAL = frozenset({"remove", "delete", "drop", "strip", "omit", "exclude", "hide", "filter", "extract", "split",
                      "evict", "discard", "take"})
# "leave X alone", "keep X unchanged": the object stays as it is.
_UNCHANGED = frozenset({"alone", "unchanged", "untouched", "intact", "as-is", "same", "stable", "today", "now",
                        "before", "is", "are", "was", "were"})
# Object roles per verb class: (direct object, locative "in X", "to X" (place verbs), instrument "with X").
ROLE_TABLE: dict[str, tuple[str, str, str, str]] = {
    CHANGE: (MODIFY, MODIFY, MODIFY, DEPEND),
    CREATE: (MODIFY, MODIFY, MODIFY, DEPEND),
    USE: (DEPEND, MODIFY, NONE, DEPEND),
    IMPORT: (DEPEND, NONE, NONE, DEPEND),
    EXPORT: (DEPEND, MODIFY, MODIFY, MODIFY),
    MOVE: (MODIFY, NONE, NONE, DEPEND),
    PASS: (NONE, MODIFY, MODIFY, NONE),
    READ: (DEPEND, DEPEND, NONE, NONE),
    TEST: (TESTED, NONE, NONE, TESTED),
    DOC: (DEPEND, MODIFY, MODIFY, DEPEND),
    RUN: (NONE, NONE, NONE, NONE),
    KEEP: (NONE, NONE, NONE, NONE),
    VERSION: (NONE, MODIFY, NONE, NONE),
}
# A clause whose object is a test or documentation artefact ("Add tests for X", "Add a section
# covering X") is about testing or documenting X.
_TEST_NOUNS = frozenset({"test", "tests", "testcase", "testcases", "case", "cases", "assertion", "assertions",
                         "regression", "spec", "specs", "fixture", "fixtures"})
_DOC_NOUNS = frozenset({"section", "note", "paragraph", "docstring", "docstrings", "jsdoc", "comment",
                        "comments", "example", "examples", "doc", "docs", "documentation", "entry", "faq",
                        "warning", "table"})


# --- clauses ----------------------------------------------------------------------------------


@dataclass
class Text:
    """One analysed text (the summary or a step) with its tokens and their roles."""

    source: str  # "summary", "steps[3]"
    tokens: list[Token]
    label: str = ""  # "context", "check", "action" or ""
    flags: set[str] = field(default_factory=set)  # "no_code_change"
    verbs: list[str] = field(default_factory=list)  # classes of the main clauses' verbs, in order


@dataclass(frozen=True)
class Interesting:
    """What may name something, for pruning: code and paths always; words that start a phrase
    (``starts``); capitalised words in ``names`` (None: every capitalised word)."""

    starts: Container[str]
    names: Container[str] | None
    more_starts: Container[str] = frozenset()


# Tokens read after the last interesting one of a sentence: enough for every look-ahead rule
# ("Add the X styles to Y" needs the "to"), so a sentence's cost follows what it names.
LOOKAHEAD_TOKENS = 4


def analyse(summary: str, steps: tuple[str, ...] | list[str],
            interesting: Interesting | None = None,
            may_name: Callable[[str], bool] | None = None, chars_max: int | None = None) -> list[Text]:
    """Every text of a plan with roles on its tokens. Section headings among the steps ("##
    Context", "## Verification") set how the steps under them read. With ``interesting``,
    sentences that name nothing it accepts are only tokenised, and each sentence is read up to
    LOOKAHEAD_TOKENS past its last interesting token; with ``may_name``, a text it rejects (a
    cheap test on the raw string) is not even tokenised. With ``chars_max``, only that many
    characters are read (the summary, then the steps in order)."""
    out: list[Text] = []
    section = ""
    left = chars_max
    for source, raw in [("summary", summary), *((f"steps[{i}]", s) for i, s in enumerate(steps))]:
        if left is not None:
            if left <= 0:
                break
            raw = raw[:left]
            left -= len(raw)
        stripped = raw.strip()
        heading = re.match(r"^#+\s*([A-Za-z][A-Za-z ]*?)\s*:?\s*$", stripped)
        if heading and source != "summary":
            section = _label_kind(heading.group(1).split()[0].lower())
            continue
        if may_name is not None and not may_name(raw):
            t = Text(source, [], section)
            first = _FIRST_WORD.match(raw)
            cls = VERB_CLASS.get(first.group(1).lower()) if first else None
            if cls is not None:
                t.verbs.append(cls)
            if _NO_CHANGE.search(raw):
                t.flags.add("no_code_change")
        else:
            t = _analyse_text(source, raw, section, is_summary=source == "summary", interesting=interesting)
        out.append(t)
    _mark_anaphors(out)
    return out


def read_only(texts: list[Text]) -> bool:
    """A plan that investigates, tests, measures or reports rather than changes code: its
    summary's first verb reads, tests, runs or documents, or it says it changes no code."""
    if any("no_code_change" in t.flags for t in texts):
        return True
    summary = texts[0] if texts and texts[0].source == "summary" else None
    return bool(summary and summary.verbs and summary.verbs[0] in (READ, TEST, RUN))


def _mark_anaphors(texts: list[Text]) -> None:
    """"Build a lookup table ... Use the table in ...": once a word has been the head of a
    compound ("lookup table"), a later "the table" refers to that thing, not to a concept."""
    seen: set[str] = set()
    for text in texts:
        toks = text.tokens
        for i, t in enumerate(toks):
            if t.kind != WORD or len(t.norm) != 1:
                continue
            if t.compound and t.head:
                seen.add(t.norm[0])
            elif t.norm[0] in seen and i > 0 and toks[i - 1].low in ("the", "this", "that", "these", "those"):
                t.anaphor = True


def _label_kind(word: str) -> str:
    if word in CONTEXT_LABELS:
        return "context"
    if word in CHECK_LABELS:
        return "check"
    if word in ACTION_LABELS:
        return "action"
    return ""


def _analyse_text(source: str, raw: str, section: str, is_summary: bool,
                  interesting: Interesting | None = None) -> Text:
    toks = tokenize(raw)
    text = Text(source, toks, section)
    # A label opening the text ("**Context:** ...", "Tests: ...", "Plan: ...").
    if len(toks) >= 2 and toks[0].kind == WORD and toks[1].text == ":":
        kind = _label_kind(toks[0].low)
        if kind:
            text.label = kind
            for t in toks[:2]:
                t.kind = PUNCT if t is toks[1] else LITERAL
    for sentence in _sentences(toks):
        if interesting is not None:
            starts, more, names = interesting.starts, interesting.more_starts, interesting.names
            marks = [t.kind in (CODE, PATH) or (bool(t.norm) and (
                t.norm[0] in starts or t.norm[0] in more
                or (t.kind == WORD and t.text[:1].isupper() and (names is None or t.text in names))))
                for t in sentence]
            last = len(marks) - 1 - marks[::-1].index(True) if True in marks else -1
            if last < 0:
                if is_summary and not text.verbs:
                    first = next((k for k, t in enumerate(sentence) if t.kind == WORD), None)
                    cls = _is_verb_at(sentence, first, True) if first is not None else None
                    if cls is not None:
                        text.verbs.append(cls)
                continue
            for t, mk in zip(sentence, marks, strict=True):
                t.hit = mk
            sentence = sentence[: last + 1 + LOOKAHEAD_TOKENS]
            _mark_heads(sentence, only_hits=True)
        else:
            _mark_heads(sentence)
        _roles_sentence(sentence, text, is_summary)
    for t in toks:
        if t.derived and t.role == MODIFY:
            t.role = DEPEND
    if text.label == "context":
        for t in toks:
            t.role = NONE
    elif text.label == "check":
        for t in toks:
            if t.role == MODIFY:
                t.role = NONE
    if _NO_CHANGE.search(raw):
        text.flags.add("no_code_change")
    return text


def _sentences(toks: list[Token]) -> list[list[Token]]:
    out: list[list[Token]] = []
    cur: list[Token] = []
    for i, t in enumerate(toks):
        if t.kind == PUNCT and t.text in (".", ";", "!", "?", "\n", "\u2014", "\u2013", "\u2026"):
            nxt = toks[i + 1] if i + 1 < len(toks) else None
            if t.text == "." and nxt is not None and nxt.kind == WORD and nxt.text[:1].islower():
                cur.append(t)
                continue
            if cur:
                out.append(cur)
            cur = []
            continue
        cur.append(t)
    if cur:
        out.append(cur)
    for s in out:
        for t in s:
            if t.kind != PUNCT:
                t.first = True
                break
    return out


def _noun_like(t: Token) -> bool:
    """A content word that can head or modify a noun phrase (so not a function word, verb-ish
    connective, adverb or number)."""
    if t.kind in (CODE, PATH):
        return True
    if t.kind != WORD:
        return False
    w = t.low
    return not (w in DETERMINERS or w in PREPOSITIONS or w in CONJUNCTIONS or w in PRONOUNS or w in AUXILIARIES
                or w in ADVERBS or w in NEGATORS or (w.endswith("ly") and len(w) > 4) or w in ("to", "not"))


def _mark_heads(toks: list[Token], only_hits: bool = False) -> None:
    """``head``: nothing noun-like follows in the same phrase; ``compound``: a plain noun that is
    not an adjective precedes it; and the other neighbour flags. With ``only_hits``, just for the
    tokens marked as interesting (the rest are never looked up)."""
    n = len(toks)
    for i, t in enumerate(toks):
        if t.kind not in (WORD, CODE, PATH) or (only_hits and not t.hit):
            continue
        nxt = toks[i + 1] if i + 1 < n else None
        prv = toks[i - 1] if i > 0 else None
        # "X calls Y": a finite verb after a name is not a noun; "-ing" and "-ed" words after a
        # noun are participles ("a class extending X"), not heads of a compound.
        if nxt is not None and _noun_like(nxt) and not (
                nxt.kind == WORD and VERB_CLASS.get(nxt.low) in (USE, READ, CHANGE) and nxt.low.endswith("s")
                and (t.kind in (CODE, PATH) or t.text[:1].isupper())) \
                and not (nxt.kind == WORD and (_nonfinite(nxt.low) or nxt.low in AUXILIARIES)):
            t.head = False
        if prv is not None and prv.kind == WORD and _noun_like(prv) and prv.low not in ADJECTIVES \
                and not prv.low.endswith(("ed", "ing")) and prv.low not in VERB_CLASS and not prv.first:
            t.compound = True
        if nxt is not None and nxt.kind == WORD and nxt.low in DERIVED_NOUNS:
            t.derived = True
        if nxt is not None and nxt.kind == WORD and nxt.low in ARTEFACTS:
            t.next_artefact = True
        if nxt is not None and nxt.kind == WORD and nxt.low == "of":
            t.next_of = True
        j = i - 1
        while j >= 0 and toks[j].kind == WORD and (toks[j].low in ADJECTIVES or toks[j].low.endswith(("ed", "ing"))) \
                and not toks[j].possessive:
            j -= 1
        if j >= 0 and (toks[j].possessive or (toks[j].kind == WORD and toks[j].low in ("its", "their", "his", "her"))):
            t.owned = True
        if j >= 0 and toks[j].kind == WORD and toks[j].low in ("any", "every", "each", "some", "no", "another", "other",
                                                               "all", "several", "many", "few"):
            t.generic = True
        if nxt is not None and nxt.kind == WORD and nxt.low in CLASSIFIERS:
            t.next_classifier = True
        if prv is not None and prv.kind in (NUM, CODE, PATH):
            t.compound = True  # "10 k", "the `pendingMatches` store", "PyCharm console"
        if nxt is not None and nxt.kind == NUM and t.kind == WORD:
            t.head = False  # "status 0", "Unicode 18": a label and a number


    # "Tree and Panel examples": both names modify "examples".
    for i in range(n - 3, -1, -1):
        a, conj, b = toks[i], toks[i + 1], toks[i + 2]
        if conj.kind == WORD and conj.low in ("and", "or") and a.kind in (WORD, CODE) \
                and i + 3 < n and toks[i + 3].kind == WORD and toks[i + 3].low in ARTEFACTS and b.kind in (WORD, CODE):
            a.next_artefact, a.head = True, False


def _verb_ing(w: str) -> bool:
    """An "-ing" form of a known verb ("wrapping", "rendering"), not a noun like "string"."""
    if not w.endswith("ing") or len(w) < 5:
        return False
    if w in VERB_CLASS:
        return True
    b = w[:-3]
    return b in VERB_CLASS or b + "e" in VERB_CLASS or (len(b) > 2 and b[-1] == b[-2] and b[:-1] in VERB_CLASS)


def _nonfinite(w: str) -> bool:
    """A participle of a known verb ("wrapping", "built"), which cannot start an imperative."""
    return w in PAST_FORMS or _verb_ing(w)


def _participle(toks: list[Token], i: int) -> bool:
    """A verb's "-ing" form used as a verb: followed by what it acts on ("wrapping a Syntax",
    "covering FORCE_COLOR", "targeting an unknown route"). At the end of a phrase it is a noun
    ("syntax highlighting.", "the word wrapping in X")."""
    w = toks[i].low
    nxt = toks[i + 1] if i + 1 < len(toks) else None
    if not _verb_ing(w):
        # An unknown verb's "-ing" acts when an article or a name follows it.
        return w.endswith("ing") and len(w) > 5 and nxt is not None and (
            nxt.kind in (CODE, PATH) or (nxt.kind == WORD and nxt.low in ("a", "an", "the", "its", "their", "each")))
    if nxt is None or nxt.kind in (PUNCT, NUM):
        return False
    return not (nxt.kind == WORD and ((nxt.low in PREPOSITIONS and nxt.low not in _PARTICLE_OBJECTS)
                                      or nxt.low in CONJUNCTIONS or nxt.low in AUXILIARIES or nxt.low in MODALS))


# After these an "-ing" word still acts: "relying on X", "falling back to Y".
_PARTICLE_OBJECTS = frozenset({"on", "upon", "back", "up", "out", "into", "over", "through", "with"})


def _head_at(toks: list[Token], j: int) -> bool:
    """Whether the token at ``j`` ends its noun phrase (computed on demand)."""
    nxt = toks[j + 1] if j + 1 < len(toks) else None
    return nxt is None or not _noun_like(nxt) or (nxt.kind == WORD and (
        _nonfinite(nxt.low) or nxt.low in AUXILIARIES))


def _is_verb_at(toks: list[Token], i: int, imperative_slot: bool) -> str | None:
    """The class of the verb at ``i`` if it reads as a verb there, else None."""
    t = toks[i]
    if t.kind != WORD:
        return None
    w = t.low
    cls = VERB_CLASS.get(w)
    prv = toks[i - 1] if i > 0 else None
    if prv is not None and prv.kind == WORD and ((prv.low in DETERMINERS and prv.low not in ("that", "which", "only",
                                                                                          "also", "just"))
                                                 or prv.low in ADJECTIVES or prv.low.endswith("'s")):
        return None  # "the fix", "a new test"
    if imperative_slot:
        if w.endswith("ing") and cls is not None:
            return None  # "rendering a Table spends ...": a gerund subject
        nxt = toks[i + 1] if i + 1 < len(toks) else None
        nxt2 = toks[i + 2] if i + 2 < len(toks) else None
        if nxt is not None and nxt.kind == CODE and nxt2 is not None and nxt2.kind == WORD \
                and (nxt2.low in _FINITE or nxt2.low in ("needs", "calls", "uses", "returns", "reads")):
            return None  # "Route `head()` needs ...": a noun before a name and its verb
        if w == "do" and i + 1 < len(toks) and toks[i + 1].low in ("the", "this", "that", "it", "so", "same"):
            return CHANGE  # "Do the same in X"
        if cls is not None:
            return _IMPERATIVE_OVERRIDE.get(w, cls)
        if _base_form_guess(t) and not (nxt is not None and nxt.kind == WORD and (
                nxt.low in CONJUNCTIONS or nxt.low in AUXILIARIES or nxt.low in MODALS or (nxt.low in VERB_CLASS
                and not nxt.low.endswith("ing")))):
            return CHANGE  # any other verb in imperative position changes something
        return None
    return cls


def _base_form_guess(t: Token) -> bool:
    """An unknown word at the start of an imperative is usually a verb ("Hide", "Bail", "Brand").
    Plural-looking words and capitalised mid-sentence names are not."""
    w = t.low
    if not w.isalpha() or len(w) < 2 or w in DETERMINERS or w in PRONOUNS or w in PREPOSITIONS \
            or w in CONJUNCTIONS or w in AUXILIARIES or w in ADJECTIVES or w in ARTEFACTS:
        return False
    if t.text[:1].isupper() and not t.first:
        return False
    if t.text.isupper() and len(t.text) > 1:
        return False
    return not (w.endswith("s") and not w.endswith("ss")) and not w.endswith(("ing", "tion", "ness", "ment"))


def _roles_sentence(sent: list[Token], text: Text, is_summary: bool) -> None:
    """Assign roles in one sentence: split into clauses at subordinators, coordinated verbs and
    topic colons, then walk each clause from its verb."""
    # A topic: "Tree: add max_depth", "scroll restoration: don't restore ..."
    topic_end = -1
    for i, t in enumerate(sent[:6]):
        if t.kind == PUNCT and t.text == ":":
            if 0 < i <= 3 and all(x.kind in (WORD, CODE, PATH) for x in sent[:i]) and i + 1 < len(sent) \
                    and not any(x.kind == WORD and (x.low in VERB_CLASS or x.low in MODALS or x.low in AUXILIARIES
                                                    or x.low in NEGATORS or x.low in DETERMINERS) for x in sent[:i]):
                topic_end = i
            break
    start = 0
    if topic_end > 0:
        for t in sent[:topic_end]:
            t.role = MODIFY if text.label != "check" else NONE
            t.topic = True
        start = topic_end + 1
    _clauses(sent[start:], text, is_summary, topic=topic_end > 0)


@dataclass
class _Frame:
    cls: str | None  # verb class in force
    verb: str = ""
    kind: str = MAIN  # clause kind
    negated: bool = False
    role: str = NONE  # the role tokens get now
    slot: str = "object"  # object, loc, to, instr, value, for
    obj_test: bool = False  # the object is a test artefact (Add tests for X)
    obj_doc: bool = False
    obj_bench: bool = False  # the object is a benchmark (a registered artefact of its own)
    prep: str = ""  # the preposition that opened the current slot
    parent: _Frame | None = None  # the main clause a condition or purpose hangs off
    in_test: bool = False  # inside a test's description
    particle: str = ""  # "up" in "speed up", "on" in "rely on"
    objects: list[Token] = field(default_factory=list)  # plain words of the direct object


def _clauses(toks: list[Token], text: Text, is_summary: bool, topic: bool) -> None:
    n = len(toks)
    frame = _Frame(None)
    subject: list[Token] = []  # content before the first verb of a main clause
    fronted: list[Token] = []  # "In X, ..." before the verb
    main_verb_seen = False
    paren = 0
    after_comma = False
    expect_verb = True  # an imperative slot: the clause start, after "and", "then", "to", modals
    i = 0
    while i < n:
        t = toks[i]
        if t.kind == PUNCT:
            if t.text == "(":
                paren += 1
            elif t.text == ")":
                paren = max(0, paren - 1)
            elif t.text == ":" and paren == 0 and i + 1 < n and toks[i + 1].kind == WORD:
                frame = _Frame(None)
                expect_verb = True
            elif t.text == "," and paren == 0:
                after_comma = True
                j = _skip_adverbs(toks, i + 1)
                if j < n and toks[j].kind == WORD and toks[j].low not in SUBORDINATORS \
                        and toks[j].low not in ("and", "or", "then", "but") and _imperative_verb(toks, j):
                    frame = _Frame(None)  # "when true, parse X": the main clause after a condition
                    expect_verb = True
                i += 1
                continue
            i += 1
            continue
        comma, after_comma = after_comma, False
        if t.kind == WORD and (expect_verb or not _content_only(t.low)):
            step = _word(toks, i, frame, subject, fronted, text, is_summary, topic, expect_verb, comma,
                         main_verb_seen)
            if step is not None:
                frame, expect_verb, main_verb_seen, i = step
                continue
        # A content token.
        if t.kind == NUM:
            t.role = frame.role if frame.cls is not None else NONE
        elif t.kind in (WORD, CODE, PATH):
            expect_verb = False
            if frame.cls is None:
                if frame.kind == MAIN and not main_verb_seen:
                    subject.append(t)
                    t.tail = frame.slot == "tail"
                t.role = NONE
            else:
                t.role = frame.role
                if frame.slot == "object":
                    frame.objects.append(t)
        i += 1
    if is_summary and not main_verb_seen:
        # A summary with no verb is a title: its words name what changes, up to a "for"/"when".
        for s in subject:
            s.role = NONE if s.tail else MODIFY
    for s in fronted:
        if s.role == "fronted":
            s.role = NONE


def _skip_adverbs(toks: list[Token], j: int) -> int:
    while j < len(toks) and toks[j].kind == WORD and toks[j].low in ADVERBS and toks[j].low != "only":
        j += 1
    return j


def _imperative_verb(toks: list[Token], j: int) -> bool:
    t = toks[j]
    cls = VERB_CLASS.get(t.low)
    return cls is not None and not _nonfinite(t.low) and not t.low.endswith("s") \
        and _is_verb_at(toks, j, True) is not None


_CONTENT: dict[str, bool] = {}


def _content_only(w: str) -> bool:
    """A word that can never steer the grammar (no function word, verb, participle, modal...):
    memoised so the common case costs one look-up."""
    c = _CONTENT.get(w)
    if c is None:
        c = not (w in SUBORDINATORS or w in PREPOSITIONS or w in DETERMINERS or w in PRONOUNS or w in AUXILIARIES
                 or w in ADVERBS or w in CONJUNCTIONS or w in NEGATORS or w in MODALS or w in VERB_CLASS
                 or w in _FINITE or w in _UNCHANGED or w in ("to", "not", "please", "need", "needs", "do")
                 or w.endswith(("ing", "ed")))
        if len(_CONTENT) < 1 << 16:
            _CONTENT[w] = c
    return c


def _word(toks: list[Token], i: int, frame: _Frame, subject: list[Token], fronted: list[Token], text: Text,
          is_summary: bool, topic: bool, expect_verb: bool, comma: bool,
          main_verb_seen: bool) -> tuple[_Frame, bool, bool, int] | None:
    """Handle a function word or verb at ``i``; None when it is a content word."""
    n = len(toks)
    t = toks[i]
    w = t.low
    if not expect_verb and _content_only(w):
        return None  # the common case: a noun or adjective in the middle of a phrase
    nxt = toks[i + 1].low if i + 1 < n else ""
    # Subordinators open context clauses.
    sub = SUBORDINATORS.get(w)
    if w == "so" and nxt != "that" and not (i + 1 < n and toks[i + 1].kind in (WORD, CODE)):
        sub = None
    if w == "as" and frame.cls == DOC and nxt in ("implemented", "described", "defined", "documented", "done",
                                                  "handled", "used"):
        toks[i + 1].verb = True
        frame.slot, frame.role = "object", _slot_role(frame, "object")  # "as implemented in X": X is described
        skip = 3 if i + 2 < n and toks[i + 2].low in ("in", "by", "inside") else 2
        return frame, False, main_verb_seen, i + skip
    if w == "as":
        sub = COMPARE if frame.cls is None or nxt in ("today", "now", "before", "is", "it", "they", "usual", "well",
                                                       "implemented", "described", "defined", "documented") \
            else None
        if sub is None:
            frame.slot, frame.role = "value", NONE
            t.role = NONE
            return frame, False, main_verb_seen, i + 1
    if w == "once" and (not nxt or nxt in PREPOSITIONS or (i + 1 < n and toks[i + 1].kind == PUNCT)):
        sub = None  # "Create the Output once in Live.start": an adverb
        t.role = NONE
        return frame, expect_verb, main_verb_seen, i + 1
    if w in ("how", "why", "what", "whether") and frame.cls is not None:
        sub = EMBED
    if w == "that" and i > 0 and toks[i - 1].verb and i + 2 < n and toks[i + 1].kind == WORD \
            and toks[i + 1].low not in PRONOUNS and toks[i + 1].low not in DETERMINERS \
            and not (toks[i + 2].kind == WORD and (toks[i + 2].low in _FINITE or toks[i + 2].low in VERB_CLASS
                                                   or toks[i + 2].low in MODALS)):
        t.role = NONE
        return frame, False, main_verb_seen, i + 1  # "Serialize that state": a determiner
    if w == "that" and not (i > 0 and toks[i - 1].kind in (WORD, CODE, PATH) and toks[i - 1].low != "so"):
        sub = None if frame.cls is None else EMBED
    elif w == "that":
        sub = REL if toks[i - 1].low != "so" else PURPOSE
    if w in ("instead", "rather", "like", "unlike", "than") and frame.cls is not None:
        sub = None  # "use X instead of Y in Z": a phrase, not a clause
    elif w in ("instead", "rather"):
        sub = COMPARE if nxt in ("of", "than") else None
    if w == "where" and frame.cls is None and not main_verb_seen:
        sub = None
    if sub == EMBED and frame.cls == DOC and not frame.negated:
        frame.slot, frame.role = "object", _slot_role(frame, "object")
        t.role = NONE
        return frame, False, main_verb_seen, i + 1
    if sub is not None:
        new = _Frame(None, kind=sub)
        new.parent = frame if frame.kind == MAIN and frame.cls not in (None, "stmt") else frame.parent
        t.role = NONE
        return new, sub in (PURPOSE,), main_verb_seen, i + 1
    if w in ("and", "or", "then", "but", "plus", "nor"):
        j = _skip_adverbs(toks, i + 1)
        if j < n and _coordinated_verb(toks, j, frame):
            t.role = NONE
            kind = frame.kind if frame.kind != "stmt" else MAIN
            nf = _Frame(None, kind=kind, negated=frame.negated and w == "or")
            return nf, True, main_verb_seen, i + 1
        if comma and frame.cls is not None:
            frame.slot, frame.role = "object", _slot_role(frame, "object")  # ", and Z into W"
        t.role = NONE
        return frame, expect_verb, main_verb_seen, i + 1
    if w == "to" and i + 1 < n and toks[i + 1].kind == WORD and VERB_CLASS.get(toks[i + 1].low) is not None \
            and not _nonfinite(toks[i + 1].low) and _is_verb_at(toks, i + 1, True):
        # "to V": a purpose after a full clause; the verb itself after "need to", "want to".
        if frame.cls is not None and frame.verb not in ("need", "needs", "want", "wants", "have", "has", "try",
                                                         "tries", "able", "going", "ask", "asks"):
            frame = _Frame(None, kind=PURPOSE)
        return frame, True, main_verb_seen, i + 1
    if w in NEGATORS:
        frame.negated = True
        if frame.cls is not None:
            frame.role = NONE
        t.role = NONE
        return frame, expect_verb or w in ("not", "never", "don't", "doesn't"), main_verb_seen, i + 1
    if w in ("need", "needs") and nxt not in ("to", "no", "not", "only"):
        pass  # "X needs the full location": a statement, handled below
    elif w in MODALS and subject and frame.cls is None and frame.kind == MAIN:
        # "X should honour Y": X is what changes (not when "X must not change"); "X can land
        # inside Y" is a statement about the code as it is.
        keep = _subject_negated(toks, i) or (w not in _CHANGE_MODALS and not _future_change(toks, i))
        for s in subject:
            s.role = NONE if keep else MODIFY
        subject.clear()
        if w not in _CHANGE_MODALS and not _future_change(toks, i):
            return _Frame("stmt", verb=w, kind="stmt"), False, True, i + 1
        return frame, True, True, i + 1
    if (w in MODALS or w == "please" or (w in ADVERBS and expect_verb)) and frame.cls is None:
        return frame, True, main_verb_seen, i + 1
    cls = _is_verb_at(toks, i, expect_verb)
    if cls is not None and expect_verb:
        t.verb = True
        nf = _start_frame(cls, w, frame, toks, i)
        if nf.kind == MAIN and not nf.negated:
            text.verbs.append(TEST if nf.obj_test and not nf.obj_bench else nf.cls or CHANGE)
        for s in fronted:
            if s.role == "fronted":
                # "In buildLocation, compare ... and warn": in a plan that changes code the
                # place is where the new code goes; in an investigation it is what is read.
                s.role = NONE if nf.negated or nf.kind != MAIN else (
                    FRONTED_READ if nf.cls in (READ, TEST) else _slot_role(nf, "loc"))
        fronted.clear()
        for s in subject:
            s.role = NONE
        subject.clear()
        t.role = NONE
        return nf, False, True, i + 1
    if frame.cls is None and subject and frame.kind == MAIN and not main_verb_seen and (
            w in _FINITE or (w in VERB_CLASS and not expect_verb and not _nonfinite(w)
            and not (t.first and t.text[:1].isupper())
            and ((w.endswith("s") and not w.endswith("ss")) or _plural_subject(subject)))):
        # A statement about the code as it is ("X calls Y", "X is slow"): context; in a summary
        # the subject is what the plan is about ("mergeHeaders overwrites Link headers").
        relied = w in ("already", "still") or (i > 0 and toks[i - 1].low in ("already", "still"))
        for s in subject:
            if is_summary and not topic and w not in ("is", "are", "was", "were"):
                s.role = MODIFY
            elif relied and not is_summary and s.kind in (CODE, PATH):
                s.role = DEPEND  # "X already handles Y": the plan relies on X as it is
            else:
                s.role = NONE
        subject.clear()
        nf = _Frame("stmt", verb=w, kind="stmt")
        t.role = NONE
        t.verb = True
        return nf, False, True, i + 1
    if frame.cls is not None and _participle(toks, i) and i > 0 and w not in ADJECTIVES \
            and (toks[i - 1].kind in (CODE, PATH) or (toks[i - 1].kind == WORD and toks[i - 1].low not in DETERMINERS)
                 or toks[i - 1].text == ","):
        # A participle after the object: "a class extending X", "a section covering Y".
        if toks[i - 1].verb and frame.slot == "object":
            t.role, t.verb = NONE, True  # "Support merging X in Y": the gerund is the object
            return frame, False, main_verb_seen, i + 1
        in_test = frame.in_test or frame.obj_test or frame.cls == TEST
        if toks[i - 1].kind == WORD and toks[i - 1].low in PREPOSITIONS and w not in _USE_PARTICIPLES \
                and w not in _DOC_PARTICIPLES and w not in _TEST_PARTICIPLES:
            t.role, t.verb = NONE, True  # "for rendering X", "without touching X": the phrase's role
            return frame, False, main_verb_seen, i + 1
        if (w in _TEST_PARTICIPLES and in_test) or w in _TEST_PARTICIPLES - _DOC_PARTICIPLES:
            nf = _Frame(TEST, verb=w, kind=frame.kind, negated=frame.negated)
        elif w in _USE_PARTICIPLES:
            nf = _Frame(USE, verb=w, kind=frame.kind, negated=frame.negated)
        elif w in _DOC_PARTICIPLES:
            nf = _Frame(DOC, verb=w, kind=frame.kind, negated=frame.negated)
        elif w in ("exporting", "re-exporting"):
            nf = _Frame(EXPORT, verb=w, kind=frame.kind, negated=frame.negated)
        else:
            nf = _Frame("participle", verb=w, kind=frame.kind, negated=frame.negated)
        nf.in_test = in_test
        nf.role = _slot_role(nf, "object")
        if in_test and nf.role in (DEPEND, MODIFY):
            nf.role = TESTED
        t.role = NONE
        t.verb = True
        return nf, False, main_verb_seen, i + 1
    if frame.cls is not None and w in PAST_FORMS and i > 0 \
            and toks[i - 1].kind in (WORD, CODE, PATH) and toks[i - 1].low not in AUXILIARIES \
            and toks[i - 1].low not in DETERMINERS:
        # A reduced relative. "the context object built in X": X is where that object lives, so
        # it shares its role; "defined next to Y", "stored on Z": it only describes.
        t.role = NONE
        t.verb = True
        if nxt in ("in", "inside", "within", "into") and frame.slot in ("object", "to", "loc"):
            return frame, False, main_verb_seen, i + 1
        nf = _Frame("participle", verb=w, kind=frame.kind, negated=frame.negated)
        return nf, False, main_verb_seen, i + 1
    if frame.kind == COND and frame.parent is not None and w in ("in", "inside", "within") and i + 1 < n \
            and toks[i + 1].kind in (CODE, PATH):
        # "Raise X when the body is empty in `Client.send`": a place named at the end of a
        # condition is where the main clause's change happens.
        main = frame.parent
        main.slot, main.role = "loc", _slot_role(main, "loc")
        t.role = NONE
        return main, False, main_verb_seen, i + 1
    if w in PREPOSITIONS and frame.cls is not None:
        _preposition(frame, toks, i)
        t.role = NONE
        return frame, False, main_verb_seen, i + 1
    if w in ("in", "inside", "within", "at", "for", "on") and frame.cls is None and frame.kind == MAIN \
            and not main_verb_seen and not subject:
        # A fronted phrase, "In `rich/traceback.py`, rename ...": decided at the verb.
        j = i + 1
        while j < n and toks[j].text != "," and j - i < 12:
            if toks[j].kind in (CODE, PATH, WORD):
                toks[j].role = "fronted" if w != "for" else NONE
                fronted.append(toks[j])
            j += 1
        return frame, True, main_verb_seen, j + 1 if j < n else j
    if frame.cls == KEEP and w in _UNCHANGED:
        frame.negated = True
        frame.role = NONE
        return frame, False, main_verb_seen, i + 1
    if frame.cls is None and w in PREPOSITIONS and w not in ("of", "to"):
        frame.slot = "tail"  # a title's "for X", "when Y": not what changes
        t.role = NONE
        return frame, False, main_verb_seen, i + 1
    if w in DETERMINERS or w in PRONOUNS or w in AUXILIARIES or w in ADVERBS or w in CONJUNCTIONS:
        t.role = NONE
        return frame, expect_verb and w in ADVERBS, main_verb_seen, i + 1
    return None


# Words after a subject that make its clause a statement about the code as it is.
_FINITE = frozenset({"is", "are", "was", "were", "has", "have", "does", "can", "currently", "already", "only",
                     "always", "still", "keeps", "builds", "gives", "makes", "runs", "reads", "writes", "shows",
                     "takes", "gets", "finds", "sets", "puts", "hides", "leaves", "spends", "end", "ends", "lands"})


def _plural_subject(subject: list[Token]) -> bool:
    """"Table and Panel pass ...", "Users pass ...": a base-form verb after such a subject is
    finite; after "HMR" it is a noun ("HMR refresh")."""
    words = [t for t in subject if t.kind == WORD]
    return any(t.low in ("and", "or") for t in words) or bool(
        subject and subject[-1].kind == WORD and subject[-1].low.endswith("s") and not subject[-1].low.endswith("ss"))


def _future_change(toks: list[Token], i: int) -> bool:
    """"X will be removed", "X will get renamed": a change to X said in the future passive."""
    window = [t.low for t in toks[i + 1 : i + 4] if t.kind == WORD]
    if toks[i].low != "will" or len(window) < 2 or window[0] not in ("be", "get"):
        return False
    past = window[1] if window[1] not in ADVERBS else (window[2] if len(window) > 2 else "")
    return past in PAST_FORMS and VERB_CLASS.get(past) in (CHANGE, CREATE, MOVE)


def _subject_negated(toks: list[Token], i: int) -> bool:
    """"X must not change", "X needs no change(s)", "X should stay as it is"."""
    window = [t.low for t in toks[i + 1 : i + 5] if t.kind == WORD]
    if not window:
        return False
    if window[0] in ("not", "never", "no") and len(window) > 1:
        if window[1] in ("change", "changes", "touch", "move", "modify", "alter", "changing"):
            return True
        if window[1] == "be" and len(window) > 2 and window[2] in ("changed", "modified", "touched", "altered"):
            return True
    return window[0] in ("stay", "remain", "stays", "remains")


def _coordinated_verb(toks: list[Token], i: int, frame: _Frame) -> bool:
    t = toks[i]
    if t.kind != WORD:
        return False
    cls = VERB_CLASS.get(t.low)
    if cls is None:
        return False
    if _nonfinite(t.low):
        return False
    # "Add X and use it in Y": a second imperative. "X and Y" (nouns) is not.
    nxt = toks[i + 1] if i + 1 < len(toks) else None
    if nxt is not None and nxt.kind == WORD and (nxt.low in AUXILIARIES or nxt.low in ("of",)):
        return False
    return frame.cls is not None or frame.kind != MAIN


def _start_frame(cls: str, w: str, prev: _Frame, toks: list[Token], i: int) -> _Frame:
    negated = prev.negated
    kind = prev.kind
    f = _Frame(cls, verb=w, kind=kind, negated=negated)
    # A particle or the verb's own preposition belongs to the verb: "speed up X", "rely on X",
    # "fall back to X", "look up X in Y".
    j = i + 1
    if w in _MAKE_FORMS and j < len(toks) and toks[j].low in ("sure", "certain"):
        toks[j].verb = True
        f.cls = RUN  # "Make sure X still Y": a check, not a change
        f.role = NONE
        return f
    if j < len(toks) and toks[j].kind == WORD:
        base = _BASE.get(w, w)
        if toks[j].low in _PARTICLES.get(base, ()) or (toks[j].low in ("up", "out", "down", "off", "away") \
                and base not in ("move", "pass")):
            toks[j].verb = True
            f.particle = toks[j].low
    # "Add tests for X", "Add a section covering Y": look at the head noun of the object.
    j = i + 1
    while j < len(toks) and j - i <= 6:
        x = toks[j]
        if x.kind == PUNCT or (x.kind == WORD and (x.low in PREPOSITIONS or x.low in CONJUNCTIONS)):
            break
        if x.kind in (WORD, CODE, PATH) and (_head_at(toks, j) or (j + 1 < len(toks) and toks[j + 1].kind == PUNCT)):
            if x.kind == WORD and x.low in _TEST_NOUNS:
                f.obj_test = True
            elif x.kind == WORD and x.low in ("benchmark", "benchmarks", "bench"):
                f.obj_test = f.obj_bench = True
            elif x.kind == WORD and x.low in _DOC_NOUNS:
                f.obj_doc = True
            break
        j += 1
    if cls == KEEP and j < len(toks) and toks[j].low == "track":
        toks[j].verb = True  # "keep track of X": record it, a change
        f.cls = CHANGE
        f.role = _slot_role(f, "object")
        return f
    if cls == KEEP and i + 1 < len(toks) and toks[i + 1].kind == WORD and toks[i + 1].low.endswith("ing"):
        # "keep using X" relies on X; "keep passing X through" is a pass-through.
        inner = VERB_CLASS.get(toks[i + 1].low)
        f.cls = USE if inner in (USE, CHANGE) and toks[i + 1].low in _USE_PARTICIPLES else KEEP
    f.role = _slot_role(f, "object")
    return f


def _slot_role(f: _Frame, slot: str) -> str:
    """The role of what follows in ``slot`` (object, loc, to, from, instr, for, value) of the
    verb frame ``f``."""
    if f.negated or f.kind != MAIN or f.cls in (None, "participle", "stmt"):
        if f.cls in (USE, DOC) and not f.negated and f.kind in (MAIN, REL) \
                and (f.verb in _USE_PARTICIPLES or f.verb in _DOC_PARTICIPLES):
            return (TESTED if f.in_test else DEPEND) if slot in ("object", "instr") else NONE
        if f.cls == TEST and not f.negated and f.kind in (MAIN, REL) and f.verb in _TEST_PARTICIPLES:
            return TESTED if slot in ("object", "instr", "for") else NONE
        return NONE
    cls = f.cls
    if cls in (CHANGE, CREATE) and f.obj_test:
        # "Add tests for X", "Add a benchmark case to benchmarks/x.py": the test is new; what it
        # tests is relied on; where it goes changes.
        return {"object": NONE, "loc": MODIFY, "to": MODIFY, "for": DEPEND if f.obj_bench else TESTED,
                "instr": TESTED, "from": NONE}.get(slot, NONE)
    if cls in (CHANGE, CREATE) and f.obj_doc and slot in ("for", "about"):
        return DEPEND
    if cls == TEST:
        return {"object": TESTED, "for": TESTED, "instr": TESTED}.get(slot, NONE)
    obj, loc, to, instr = ROLE_TABLE.get(cls, ROLE_TABLE[CHANGE])
    if slot == "object":
        return obj
    if slot == "loc":
        return loc
    if slot == "to":
        if f.verb in _TO_PLACE_FORMS:
            return to
        return DEPEND if f.verb in _TO_USE_FORMS else NONE
    if slot == "from":
        if cls == CHANGE and f.verb in _REMOVAL_FORMS:
            return MODIFY
        return instr if cls not in (READ, MOVE) else NONE
    if slot == "instr":
        if cls == READ and f.verb in _COMPARE_FORMS:
            return DEPEND
        if cls == CREATE and f.prep == "with":
            return MODIFY  # "Create x.py with A, B": what goes in it
        return instr
    if slot == "for" and cls == CHANGE:
        return FOR_NAME
    return NONE


def _preposition(f: _Frame, toks: list[Token], i: int) -> None:
    w = toks[i].low
    nxt = toks[i + 1].low if i + 1 < len(toks) else ""
    if toks[i].verb and w == f.particle:
        return  # the verb's own particle: the object follows
    if w in ("instead", "rather", "like", "unlike", "as", "than"):
        f.slot, f.role = "value", NONE
        return
    if w == "of":
        if i > 0 and toks[i - 1].low in DERIVED_NOUNS and f.role == MODIFY:
            f.role = DEPEND  # "a subclass of Client": the new class relies on Client
        return  # "the type of X": same role as the head before it
    if w == "on" and nxt == "top":
        f.slot, f.role = "instr", _slot_role(f, "instr")
        return
    if w in ("based", "built") and nxt == "on":
        f.slot, f.role = "instr", _slot_role(f, "instr")
        return
    if w == "out" and nxt == "of":
        f.slot, f.role = "from", _slot_role(f, "from")
        return
    if f.slot == "object" and w in ("to", "in", "into", "inside", "onto") and f.verb in _ADD_FORMS:
        # "Add the X styles to the default theme": the object is new content; the place changes.
        # "Add CacheStore to __all__": an existing name is referenced; "Add Client.retry in x.py"
        # names a new member of an existing class (matching tells the two apart).
        for o in f.objects:
            if o.kind == WORD and o.role == MODIFY:
                o.role = NONE
            elif o.kind == CODE and o.role == MODIFY and f.verb in _REFERENCE_ADD_FORMS:
                o.role = ADDED
    if w in ("to", "onto") or (w == "into" and f.cls in (MOVE, PASS, EXPORT, IMPORT)):
        f.slot, f.role = "to", _slot_role(f, "to")
        if w == "into" and f.cls == IMPORT:
            f.role = NONE
        return
    if w in _LOCATIVE:
        f.slot, f.role = "loc", _slot_role(f, "loc")
        return
    if w == "from":
        f.slot, f.role = "from", _slot_role(f, "from")
        return
    if w in _INSTRUMENT:
        f.prep = w
        f.slot, f.role = "instr", _slot_role(f, "instr")
        return
    if w == "for":
        f.slot, f.role = "for", _slot_role(f, "for")
        return
    if w == "without":
        f.negated = True
        f.slot, f.role = "value", NONE
        return
    if w in _VALUE:
        f.slot, f.role = "value", NONE


# Verbs whose object comes after a fixed preposition or particle.
_PARTICLES: dict[str, tuple[str, ...]] = {
    "rely": ("on", "upon"), "depend": ("on", "upon"), "build": ("on", "upon"), "base": ("on",),
    "look": ("at", "up", "for", "into"), "fall": ("back",), "delegate": ("to",), "switch": ("to",),
    "listen": ("to", "for"), "subscribe": ("to",), "refer": ("to",), "conform": ("to",), "point": ("to", "at"),
    "hook": ("into",), "compare": ("with", "to", "against"), "wait": ("for",), "call": ("into",),
    "speed": ("up",), "clean": ("up",), "set": ("up",), "bail": ("out",), "write": ("up",), "break": ("out",),
    "pick": ("up",), "fill": ("in",), "opt": ("in", "out", "into"), "react": ("to",), "respond": ("to",),
    "account": ("for",), "check": ("for",), "test": ("for",), "iterate": ("over",), "loop": ("over",),
    "search": ("for",), "ask": ("for",), "deal": ("with",), "comply": ("with",), "agree": ("with",),
}
_BASE: dict[str, str] = {f: v for v in _PARTICLES for f in _forms(v)}
_TO_PLACE_FORMS = frozenset(x for v in _TO_PLACE for x in _forms(v))
_TO_USE_FORMS = frozenset(x for v in ("fall", "delegate", "switch", "defer", "redirect") for x in _forms(v))
_REMOVAL_FORMS = frozenset(x for v in _REMOVAL for x in _forms(v))
_COMPARE_FORMS = frozenset(_forms("compare"))
_MAKE_FORMS = frozenset(_forms("make"))
_TEST_PARTICIPLES = frozenset({"checking", "asserting", "verifying", "testing", "exercising", "covering"})
_REFERENCE_ADD_FORMS = frozenset(x for v in ("add", "append", "insert", "register") for x in _forms(v))
_ADD_FORMS = frozenset(x for v in ("add", "append", "insert", "register", "introduce", "include", "allow", "support",
                                   "accept", "permit", "enable", "handle") for x in _forms(v))


# --- helpers for matching -----------------------------------------------------------------------


def plural(word: str) -> bool:
    """A plural noun by its ending ("routers", "tables"), not "status", "alias", "analysis"."""
    return len(word) > 3 and word.endswith("s") and not word.endswith(("ss", "us", "is", "as", "os", "ys"))


@lru_cache(maxsize=4096)
def ing_bases(word: str) -> tuple[str, ...]:
    """Bases of an "-ing" word, for the last word of a phrase ("hash scrolling" ~ "hash scroll")."""
    if not word.endswith("ing") or len(word) < 6:
        return ()
    b = word[:-3]
    out = [b, b + "e"]
    if len(b) > 2 and b[-1] == b[-2]:
        out.append(b[:-1])
    return tuple(stem(x) for x in out)
