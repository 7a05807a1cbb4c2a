"""The read-only allowlist (shim/readonly.py): what an agent may run before its plan has a
verdict. Every bypass named in issue 17, and quoting, globbing and chaining."""

from __future__ import annotations

import pytest

from tetherlab.shim.readonly import read_only, tokenize, why_not

READ_ONLY = [
    "ls", "ls -la src", "ls *.py", "cat src/app.py", "cat 'a file.txt'", "head -n 20 README.md", "tail -5 x",
    "wc -l src/*.py", "grep -rn 'TODO' src", "grep -e foo -- -x", "pwd", "which git", "stat README.md",
    "du -sh .", "echo hello", "cd src && ls", "tree -L 2", "tree -a -L 3 src", "file README.md",
    "find . -name '*.py'", "find src -type f -name \"*.ts\" -maxdepth 2", "find . \\( -name a -o -name b \\) -print",
    "find . -newermt 2024-01-01 -print0", "rg foo", "rg -n --hidden -g '*.py' 'def main' src", "rg -uu -i x",
    "rg -A3 -e foo", "git status", "git status --porcelain=v1 -b", "git log --oneline -n 5", "git log -5",
    "git log --format=%H --since=2.days", "git diff", "git diff --stat HEAD~1", "git diff --cached -- src/app.py",
    "git show HEAD:src/app.py", "git -C sub log", "git --no-pager diff", "git branch", "git branch -a -v",
    "git branch --list 'feat*'", "git tag", "git tag -l 'v1.*'", "git remote -v", "git remote get-url origin",
    "git rev-parse --show-toplevel", "git rev-parse HEAD", "git ls-files -o --exclude-standard", "git blame -L 1,9 x",
    "git grep -n foo", "git log -- '*.py'", "git diff --word-diff=color",
    "ls | head -3", "git log | head", "grep foo a; grep bar b", "ls && cat x || echo no", "ls\nwc -l x",
    "ls  # list the files", "ls # a comment; rm -rf /",
]

BYPASSES = [
    # the list
    "find . -exec sed -i s/a/b/ {} ;", "find . -exec sed -i s/a/b/ {} \\;", "find . -execdir rm {} +",
    "find -delete", "find . -name '*.pyc' -delete", "find . -fprint out.txt", "find . -ok rm {} ;",
    "git diff --output=F", "git diff --output F", "git log -p --output=/tmp/x", "git diff --out=F",
    "rg --pre cat foo", "rg --pre=./script foo", "rg --pre-glob '*' --pre sh x", "rg --hostname-bin ./x foo",
    "git branch -D main", "git branch -d x", "git branch new-branch", "git branch -m a b", "git tag v1",
    "git tag -d v1", "git remote add evil url", "git remote set-url origin x", "git stash", "git checkout .",
    "git commit -am x", "git reset --hard", "git clean -fdx", "git apply p.diff", "git config user.name x",
    "git -c core.pager=sh log", "git -c diff.external=./x diff", "git grep -O foo", "git grep --open-files-in-pager x",
    "git diff --ext-diff", "git log --show-signature", "git fetch", "git push",
    "tree -o out.txt", "tree -R -H . ", "file -C -m x", "file --compile",
    # redirection, substitution, expansion, subshells, background jobs
    "echo x > f", "echo x >> f", "cat a 2> f", "cat < f", "ls >f", "echo $(rm -rf x)", "echo `rm x`",
    "echo \"$(rm x)\"", "echo $HOME", "cat ${X}", "(rm x)", "ls & rm x", "ls |& tee x", "cat <(rm x)",
    # chaining to a writer
    "ls; rm -rf src", "ls && rm x", "ls || touch x", "cat x | tee y", "ls\nrm -rf src", "grep x f | sh",
    "ls # ok\nrm -rf src",
    # programs not on the list, paths, assignments
    "rm x", "touch x", "mv a b", "cp a b", "sed -i s/a/b/ x", "awk '{print > \"f\"}' x", "sort -o f x", "tee f",
    "python -c 'open(1)'", "sh -c ls", "bash -c ls", "xargs rm", "npm install", "./ls", "/bin/ls", "bin/cat x",
    "FOO=1 ls", "GIT_EXTERNAL_DIFF=x git diff", "env ls", "command ls", "{ ls; }",
    # globbing into an option of a program whose options write
    "find *", "find . -name *.py", "git diff *", "git log src/*", "rg foo *", "tree *", "git {log,--output=x}",
    "rg foo {a,--pre=sh}",
    # quoting that does not hide anything, and what the tokenizer refuses
    "'rm' x", "r\\m x", "\"rm\" -rf x", "ls 'unterminated", "ls \"unterminated", "ls \\", "", "   ",
    "ls ;; rm x", "| ls", "ls |",
]


@pytest.mark.parametrize("command", READ_ONLY)
def test_read_only_commands_pass(command: str) -> None:
    assert why_not(command) is None


@pytest.mark.parametrize("command", BYPASSES)
def test_writes_and_unknowns_are_refused(command: str) -> None:
    assert not read_only(command), command


def test_quotes_make_one_word_and_hide_operators() -> None:
    words = tokenize("grep 'a; rm -rf x' \"b > c\" d\\ e")
    assert [w.text for w in words] == ["grep", "a; rm -rf x", "b > c", "d e"]  # type: ignore[union-attr]
    assert read_only("grep 'a; rm -rf x' \"b > c\"")
    assert read_only("echo '$(rm x)'")  # single quotes: nothing is substituted


def test_quoted_globs_do_not_expand_and_unquoted_ones_do() -> None:
    quoted, bare = tokenize("'*.py'")[0], tokenize("*.py")[0]
    assert not quoted.expands and bare.expands  # type: ignore[union-attr]


def test_the_reason_names_the_offending_part() -> None:
    assert "-exec" in (why_not("find . -exec rm {} ;") or "")
    assert "--output" in (why_not("git diff --output=F") or "")
    assert "not a read-only git subcommand" in (why_not("git stash") or "")
