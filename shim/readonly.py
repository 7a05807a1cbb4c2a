"""Which shell commands an agent may run before its plan has a verdict: a parsed allowlist.

Before a verdict every tool call that could change files is denied, except a shell command that
this module proves read-only. The command is tokenised the way a POSIX shell would (quotes,
backslashes, operators); it passes only when:

- it has no redirection, substitution, expansion of variables, subshell, background job or
  environment assignment (``>``, ``<``, ``$``, backticks, ``(``, ``&``, ``NAME=value``);
- every simple command in it, chained by ``|``, ``&&``, ``||``, ``;`` or a newline, is a program
  of the allowlist below, named bare (no path), with only the options listed for it;
- a word the shell would expand (an unquoted ``*``, ``?``, ``[``, ``{`` or ``~``) is passed only
  to programs none of whose options write, since a file named like an option (``-delete``,
  ``--output=x``) would otherwise become one.

Programs with no option that writes or runs another program (``cat``, ``ls``, ``grep``...) take
any option. ``find``, ``rg``, ``tree``, ``file`` and each ``git`` subcommand take exactly the
options listed (``find -exec``/``-delete``, ``rg --pre``, ``git diff --output``, ``tree -o`` and
every git subcommand that writes are absent). git's long options are matched exactly, so an
abbreviation git would accept (``--out``) is refused too.
"""

from __future__ import annotations

from dataclasses import dataclass

COMMAND_MAX_CHARS = 4000
SEPARATORS = ("|", "&&", "||", ";", "\n")
FORBIDDEN_CHARS = frozenset("$`")  # expansion and substitution, quoted in "..." or not

# Programs none of whose options write a file or run another program.
ANY_OPTION = frozenset({"ls", "cat", "head", "tail", "wc", "grep", "egrep", "fgrep", "echo", "pwd", "which",
                        "stat", "du", "basename", "dirname", "realpath", "true", "cd"})

FIND_FLAGS = frozenset({"-H", "-L", "-P"})
FIND_NO_VALUE = frozenset({
    "-print", "-print0", "-ls", "-prune", "-empty", "-depth", "-follow", "-xdev", "-mount", "-true", "-false",
    "-readable", "-writable", "-executable", "-nouser", "-nogroup", "-not", "!", "-a", "-and", "-o", "-or", "(",
    ")", ",", "-daystart", "-noleaf", "-quit",
})
FIND_VALUE = frozenset({
    "-name", "-iname", "-path", "-ipath", "-wholename", "-iwholename", "-regex", "-iregex", "-type", "-xtype",
    "-maxdepth", "-mindepth", "-size", "-mtime", "-mmin", "-atime", "-amin", "-ctime", "-cmin", "-newer",
    "-anewer", "-cnewer", "-perm", "-user", "-group", "-uid", "-gid", "-links", "-inum", "-samefile", "-lname",
    "-ilname", "-printf", "-regextype", "-used", "-fstype", "-newermt", "-newerct", "-newerat",
})

RG_NO_VALUE = frozenset({
    "-i", "--ignore-case", "-s", "--case-sensitive", "-S", "--smart-case", "-w", "--word-regexp", "-x",
    "--line-regexp", "-F", "--fixed-strings", "-n", "--line-number", "-N", "--no-line-number", "-l",
    "--files-with-matches", "--files-without-match", "-c", "--count", "--count-matches", "-v", "--invert-match",
    "-o", "--only-matching", "-u", "-uu", "-uuu", "--unrestricted", "-.", "--hidden", "-L", "--follow",
    "--files", "--json", "--vimgrep", "--column", "--no-heading", "--heading", "-p", "--pretty", "--no-ignore",
    "--no-ignore-vcs", "-U", "--multiline", "--multiline-dotall", "--trim", "--stats", "--type-list",
    "--no-messages", "-q", "--quiet", "-0", "--null", "--passthru", "-H", "--with-filename", "-I",
    "--no-filename", "-a", "--text", "-P", "--pcre2", "--sort-files", "-z", "--search-zip", "--debug",
    "--no-config", "-b", "--byte-offset", "--crlf", "--include-zero", "--no-unicode", "--one-file-system",
})
RG_VALUE = frozenset({
    "-g", "--glob", "--iglob", "-t", "--type", "-T", "--type-not", "-e", "--regexp", "-A", "--after-context",
    "-B", "--before-context", "-C", "--context", "-m", "--max-count", "-d", "--max-depth", "-M",
    "--max-columns", "--color", "--colors", "--sort", "--sortr", "-r", "--replace", "-E", "--encoding",
    "--max-filesize", "-j", "--threads", "--context-separator", "--field-match-separator", "--engine",
    "--path-separator", "--type-add", "-f", "--file", "--ignore-file",
})
TREE_NO_VALUE = frozenset("adflxpsughDFqNQrtvUcCAS") | frozenset({"--noreport", "--dirsfirst", "--du", "--prune",
                                                                    "--charset", "-J", "--gitignore"})
TREE_VALUE = frozenset({"-L", "-P", "-I", "--filelimit", "--sort", "--timefmt"})
FILE_NO_VALUE = frozenset("bhiIkLNprsSzZ0") | frozenset({"--brief", "--mime", "--mime-type", "--mime-encoding",
                                                          "--dereference", "--no-dereference", "--keep-going",
                                                          "--raw", "--special-files", "--uncompress"})
FILE_VALUE = frozenset({"-m", "--magic-file", "-e", "--exclude", "-F", "--separator", "-f", "--files-from"})

# git: global options before the subcommand, then per read-only subcommand its exact options.
GIT_GLOBAL_NO_VALUE = frozenset({"--no-pager", "-P", "--no-optional-locks", "--literal-pathspecs"})
GIT_GLOBAL_VALUE = frozenset({"-C"})  # no -c: a config value may name a program to run
_GIT_HISTORY = frozenset({
    "-p", "-u", "--patch", "-s", "--no-patch", "--stat", "--shortstat", "--numstat", "--name-only",
    "--name-status", "--summary", "--raw", "--dirstat", "--oneline", "--graph", "--decorate", "--no-decorate",
    "--all", "--branches", "--tags", "--remotes", "--abbrev-commit", "--no-abbrev-commit", "--color",
    "--no-color", "--reverse", "--first-parent", "--merges", "--no-merges", "--follow", "--topo-order",
    "--date-order", "--left-right", "--cherry-pick", "--boundary", "-w", "--ignore-all-space", "-b",
    "--ignore-space-change", "--ignore-blank-lines", "-W", "--function-context", "--no-ext-diff",
    "--no-textconv", "--full-index", "--check", "--exit-code", "--quiet", "--relative", "--minimal",
    "--histogram", "--patience", "-M", "--find-renames", "--no-renames", "--cached", "--staged",
    "--word-diff", "--no-index", "-R", "-z", "--full-history", "--simplify-merges", "--pretty",
    "--no-walk", "--source", "--name-rev", "-m", "--cc", "-c", "--compact-summary", "--patch-with-stat",
    "--abbrev", "--no-prefix", "--ignore-submodules", "-L",
})
_GIT_HISTORY_VALUE = frozenset({
    "-n", "--max-count", "--skip", "--since", "--until", "--after", "--before", "--author", "--committer",
    "--grep", "--format", "--pretty", "--date", "--diff-filter", "-U", "--unified", "--stat", "--color",
    "--word-diff", "--relative", "--abbrev", "--decorate", "-S", "-G", "--dirstat", "--inter-hunk-context",
    "--find-renames", "-M", "--ignore-submodules", "--encoding", "--diff-algorithm", "--anchored",
})
GIT_SUBCOMMANDS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    # subcommand: (options without a value, options with a value: "--x=v", "--x v", "-Xv" or "-X v")
    "log": (_GIT_HISTORY, _GIT_HISTORY_VALUE),
    "show": (_GIT_HISTORY, _GIT_HISTORY_VALUE),
    "diff": (_GIT_HISTORY, _GIT_HISTORY_VALUE),
    "shortlog": (frozenset({"-s", "--summary", "-n", "--numbered", "-e", "--email", "--all"}),
                 frozenset({"--since", "--until", "--author", "--format", "--group"})),
    "status": (frozenset({"-s", "--short", "-b", "--branch", "--porcelain", "--long", "-v", "--verbose", "-z",
                          "--ignored", "--ahead-behind", "--no-ahead-behind", "--show-stash", "--renames",
                          "--no-renames", "-u", "-uno", "-unormal", "-uall"}),
               frozenset({"--porcelain", "--untracked-files", "--ignored", "--ignore-submodules", "--column"})),
    "branch": (frozenset({"-a", "--all", "-r", "--remotes", "-v", "-vv", "--verbose", "--list", "-l",
                          "--show-current", "--no-color", "--color", "--no-column", "-i", "--ignore-case"}),
               frozenset({"--contains", "--no-contains", "--merged", "--no-merged", "--sort", "--format",
                          "--points-at", "--color", "--abbrev", "--column"})),
    "tag": (frozenset({"-l", "--list", "--no-color", "--color", "-i", "--ignore-case", "--no-column"}),
            frozenset({"-n", "--contains", "--no-contains", "--merged", "--no-merged", "--sort", "--format",
                       "--points-at", "--column"})),
    "remote": (frozenset({"-v", "--verbose"}), frozenset()),
    "rev-parse": (frozenset({"--show-toplevel", "--abbrev-ref", "--verify", "--short", "--git-dir",
                             "--is-inside-work-tree", "--is-inside-git-dir", "--show-prefix", "--show-cdup",
                             "--git-common-dir", "--absolute-git-dir", "--symbolic-full-name", "-q", "--quiet",
                             "--is-bare-repository", "--all", "--branches", "--tags", "--symbolic", "--sq"}),
                  frozenset({"--short", "--git-path", "--abbrev-ref", "--default", "--since", "--until"})),
    "ls-files": (frozenset({"-c", "--cached", "-d", "--deleted", "-m", "--modified", "-o", "--others", "-i",
                            "--ignored", "-s", "--stage", "-u", "--unmerged", "-k", "--killed", "-z",
                            "--exclude-standard", "--directory", "--no-empty-directory", "--full-name",
                            "--error-unmatch", "--eol", "--debug", "-t", "-v", "--recurse-submodules"}),
                 frozenset({"-x", "--exclude", "-X", "--exclude-from", "--exclude-per-directory", "--with-tree",
                            "--abbrev", "--format"})),
    "ls-tree": (frozenset({"-r", "-t", "-d", "-l", "--long", "-z", "--name-only", "--name-status",
                           "--full-name", "--full-tree", "--object-only"}),
                frozenset({"--abbrev", "--format"})),
    "blame": (frozenset({"-l", "-t", "-s", "-e", "-w", "-c", "-p", "--porcelain", "--line-porcelain",
                         "--incremental", "--show-email", "--show-name", "--show-number", "-f", "-n",
                         "--root", "--show-stats", "--minimal", "--no-progress"}),
              frozenset({"-L", "-M", "-C", "--since", "--abbrev", "--date", "--ignore-rev",
                         "--ignore-revs-file", "--contents"})),
    "grep": (frozenset({"-i", "--ignore-case", "-w", "--word-regexp", "-v", "--invert-match", "-n",
                        "--line-number", "-l", "--files-with-matches", "-L", "--files-without-match", "-c",
                        "--count", "-h", "-H", "--full-name", "-E", "--extended-regexp", "-F", "--fixed-strings",
                        "-P", "--perl-regexp", "-G", "--basic-regexp", "-I", "--cached", "--untracked",
                        "--no-index", "--no-exclude-standard", "--exclude-standard", "-q", "--quiet", "-z",
                        "--null", "-o", "--only-matching", "--heading", "--break", "-p", "--show-function",
                        "-W", "--function-context", "--column", "--all-match", "--and", "--or", "--not", "-a",
                        "--text", "-r", "--recursive", "--no-recursive", "--no-color", "--color"}),
             frozenset({"-e", "-f", "-A", "--after-context", "-B", "--before-context", "-C", "--context",
                        "--max-depth", "-m", "--max-count", "--threads", "--color"})),
    "describe": (frozenset({"--tags", "--all", "--long", "--always", "--exact-match", "--first-parent",
                            "--contains", "--dirty"}),
                 frozenset({"--abbrev", "--match", "--exclude", "--candidates", "--dirty"})),
    "cat-file": (frozenset({"-t", "-s", "-e", "-p", "--textconv", "--filters"}), frozenset({"--path"})),
    "merge-base": (frozenset({"-a", "--all", "--is-ancestor", "--independent", "--octopus", "--fork-point"}),
                   frozenset()),
    "rev-list": (frozenset({"--count", "--all", "--reverse", "--first-parent", "--merges", "--no-merges",
                            "--objects", "--left-right", "--topo-order", "--date-order", "--abbrev-commit",
                            "--oneline"}),
                 frozenset({"-n", "--max-count", "--since", "--until", "--author", "--grep", "--format",
                            "--skip"})),
}
# Listing is read-only; a name after these creates, renames or deletes (git branch foo).
GIT_LIST_ONLY = {"branch": frozenset({"--list", "-l"}), "tag": frozenset({"-l", "--list"})}


@dataclass(frozen=True)
class Word:
    text: str
    expands: bool  # an unquoted glob, brace or tilde character: the shell may turn it into other words


class Refused(Exception):
    """Not provably read-only; the message says why (for tests and logs)."""


def tokenize(command: str) -> list[Word | str]:
    """Words and operators (``str`` items are separators) of a POSIX shell command line.
    Raises Refused for anything this module does not model (it may write or run code)."""
    out: list[Word | str] = []
    buf: list[str] = []
    expands = False
    started = False  # a word is under way (also for an empty quoted word: '')
    i, n = 0, len(command)

    bare: list[str] = []  # the unquoted characters of the word under way, for brace and tilde rules

    def end_word() -> None:
        nonlocal buf, expands, started, bare
        if started:
            text = "".join(bare)
            braces = "{" in text and "}" in text and ("," in text or ".." in text)
            out.append(Word("".join(buf), expands or braces))
        buf, expands, started, bare = [], False, False, []

    while i < n:
        ch = command[i]
        if ch in FORBIDDEN_CHARS:
            raise Refused(f"{ch!r}: expansion or command substitution")
        if ch == "\\":
            if i + 1 < n and command[i + 1] == "\n":  # a line continuation
                i += 2
                continue
            if i + 1 >= n:
                raise Refused("a trailing backslash")
            buf.append(command[i + 1])
            started = True
            i += 2
            continue
        if ch == "'":
            j = command.find("'", i + 1)
            if j < 0:
                raise Refused("an unterminated quote")
            buf.append(command[i + 1 : j])
            started = True
            i = j + 1
            continue
        if ch == '"':
            j = i + 1
            while j < n and command[j] != '"':
                if command[j] == "\\" and j + 1 < n and command[j + 1] in '"\\$`\n':
                    buf.append(command[j + 1])
                    j += 2
                    continue
                if command[j] in FORBIDDEN_CHARS:
                    raise Refused(f"{command[j]!r} inside double quotes: expansion or substitution")
                buf.append(command[j])
                j += 1
            if j >= n:
                raise Refused("an unterminated quote")
            started = True
            i = j + 1
            continue
        if ch in " \t":
            end_word()
            i += 1
            continue
        if ch == "#" and not started:
            j = command.find("\n", i)  # a comment runs to the end of its line; the next line still runs
            i = n if j < 0 else j
            continue
        two = command[i : i + 2]
        if two in ("&&", "||"):
            end_word()
            out.append(two)
            i += 2
            continue
        if ch in "|;\n":
            end_word()
            out.append(ch)
            i += 1
            continue
        if ch in "<>&()":
            raise Refused(f"{ch!r}: redirection, a background job or a subshell")
        if ch in "*?[":
            expands = True
        if ch == "~" and not started:
            expands = True  # a tilde starting a word becomes a home folder
        bare.append(ch)
        buf.append(ch)
        started = True
        i += 1
    end_word()
    return out


def commands(tokens: list[Word | str]) -> list[list[Word]]:
    """Simple commands between separators; an empty one (``a ;; b``, a leading ``|``) is refused,
    except a trailing ``;`` or newline."""
    cmds: list[list[Word]] = [[]]
    for t in tokens:
        if isinstance(t, str):
            if not cmds[-1]:
                raise Refused(f"{t!r} with no command before it")
            cmds.append([])
        else:
            cmds[-1].append(t)
    if not cmds[-1]:
        if len(cmds) > 1 and isinstance(tokens[-1], str) and tokens[-1] in (";", "\n"):
            cmds.pop()
        else:
            raise Refused("an empty command")
    return cmds


def _split_option(arg: str) -> tuple[str, str | None]:
    if arg.startswith("--") and "=" in arg:
        name, _, value = arg.partition("=")
        return name, value
    return arg, None


def _options(words: list[Word], no_value: frozenset[str], value: frozenset[str], program: str,
             short_clusters: bool = False, list_only: frozenset[str] | None = None) -> None:
    """Check every option of ``words`` (after the program) against the allowlist."""
    i = 0
    positional = False
    listing = False
    after_dashdash = False
    while i < len(words):
        w = words[i]
        arg = w.text
        if after_dashdash or not arg.startswith("-") or arg == "-":
            if w.expands and not after_dashdash:
                raise Refused(f"{program}: {arg!r} is expanded by the shell (a file named like an option would "
                              "become one)")
            positional = True
            i += 1
            continue
        if arg == "--":
            after_dashdash = True
            i += 1
            continue
        if w.expands:
            raise Refused(f"{program}: option {arg!r} is expanded by the shell")
        name, inline = _split_option(arg)
        if list_only is not None and name in list_only:
            listing = True
        if inline is not None:
            if name not in value:
                raise Refused(f"{program}: option {name!r} is not on the read-only list")
        elif name in no_value:
            pass
        elif name in value:
            i += 1  # its value is the next word
            if i >= len(words):
                raise Refused(f"{program}: option {name!r} needs a value")
        elif not name.startswith("--") and len(name) > 2 and name[:2] in value:
            pass  # -n5, -U3: a short option with its value attached
        elif short_clusters and not name.startswith("--") and all(f"-{c}" in no_value for c in name[1:]):
            pass  # -la
        elif not name.startswith("--") and name[1:].isdigit() and "-n" in value:
            pass  # git log -5
        else:
            raise Refused(f"{program}: option {name!r} is not on the read-only list")
        i += 1
    if list_only is not None and positional and not listing:
        raise Refused(f"{program}: a name without --list would create or change something")


def _find(words: list[Word]) -> None:
    i = 0
    while i < len(words) and words[i].text in FIND_FLAGS:
        i += 1
    for w in words[i:]:
        if w.expands:  # a file named -delete among the expansion would become an action
            raise Refused(f"find: {w.text!r} is expanded by the shell (quote patterns: -name '*.py')")
    while i < len(words):  # starting points
        w = words[i]
        if w.text.startswith("-") or w.text in ("!", "(", ")", ","):
            break
        i += 1
    while i < len(words):
        w = words[i]
        if w.text in FIND_NO_VALUE:
            i += 1
        elif w.text in FIND_VALUE:
            if i + 1 >= len(words):
                raise Refused(f"find: {w.text} needs a value")
            i += 2
        else:
            raise Refused(f"find: {w.text!r} is not on the read-only list (-exec, -delete, -fprint... can write)")


def _git(words: list[Word]) -> None:
    i = 0
    while i < len(words):
        arg = words[i].text
        if arg in GIT_GLOBAL_NO_VALUE:
            i += 1
        elif arg in GIT_GLOBAL_VALUE:
            i += 2
        elif arg.startswith("-"):
            raise Refused(f"git: global option {arg!r} is not on the read-only list")
        else:
            break
    if i >= len(words):
        raise Refused("git: no subcommand")
    sub = words[i]
    if sub.expands or sub.text not in GIT_SUBCOMMANDS:
        raise Refused(f"git {sub.text}: not a read-only git subcommand")
    rest = words[i + 1 :]
    if sub.text == "remote" and rest and rest[0].text in ("get-url", "show"):
        if any(w.text.startswith("-") or w.expands for w in rest[1:]) or len(rest) != 2:
            raise Refused("git remote: only 'get-url NAME' or 'show NAME'")
        return
    no_value, value = GIT_SUBCOMMANDS[sub.text]
    _options(rest, no_value, value, f"git {sub.text}", list_only=GIT_LIST_ONLY.get(sub.text))
    if sub.text == "remote" and rest and not all(w.text in no_value for w in rest):
        raise Refused("git remote: only listing")


def check_simple(words: list[Word]) -> None:
    program = words[0]
    if program.expands or "/" in program.text or "=" in program.text:
        raise Refused(f"{program.text!r}: only bare program names from the list, no paths or assignments")
    name = program.text
    args = words[1:]
    if name in ANY_OPTION:
        return
    if name == "find":
        _find(args)
    elif name == "git":
        _git(args)
    elif name == "rg":
        _options(args, RG_NO_VALUE, RG_VALUE, "rg", short_clusters=True)
    elif name == "tree":
        _options(args, frozenset(f"-{c}" if len(c) == 1 else c for c in TREE_NO_VALUE), TREE_VALUE, "tree",
                 short_clusters=True)
    elif name == "file":
        _options(args, frozenset(f"-{c}" if len(c) == 1 else c for c in FILE_NO_VALUE), FILE_VALUE, "file",
                 short_clusters=True)
    else:
        raise Refused(f"{name!r} is not on the read-only list")


def why_not(command: str) -> str | None:
    """None when ``command`` is provably read-only, else the reason it is not."""
    if not command.strip():
        return "an empty command"
    if len(command) > COMMAND_MAX_CHARS:
        return f"longer than {COMMAND_MAX_CHARS} characters"
    try:
        for words in commands(tokenize(command)):
            check_simple(words)
    except Refused as e:
        return str(e)
    return None


def read_only(command: str) -> bool:
    return why_not(command) is None
