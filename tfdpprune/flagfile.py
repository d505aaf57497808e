"""Flagfile expansion: nested `--flagfile=` paths resolve from the including file.

absl resolves every `--flagfile=` path against the current directory, so a
flagfile that includes another (`flags/fashion_mnist/x.cfg` includes
`--flagfile=flags/base.cfg`) only works from the repository root. `expand`
inlines flagfiles itself before absl parses the flags: a path on the command
line is taken relative to the current directory; a path inside a flagfile
relative to that file's directory first, then relative to each of its parent
directories (so the repository-root-relative paths of existing flagfiles work
from anywhere), then relative to the current directory.

```python
argv = expand(["train", "--flagfile=flags/fashion_mnist/best_eps3.cfg"])
```
"""

import os
from typing import List, Optional, Sequence

_MAX_DEPTH = 32


def _candidates(path: str, including: Optional[str]):
  if os.path.isabs(path) or including is None:
    yield path
    return
  directory = os.path.dirname(os.path.abspath(including))
  while True:
    yield os.path.join(directory, path)
    parent = os.path.dirname(directory)
    if parent == directory:
      break
    directory = parent
  yield path


def resolve(path: str, including: Optional[str] = None) -> str:
  """The file a `--flagfile=path` (inside `including`, or None) names."""
  for candidate in _candidates(os.path.expanduser(path), including):
    if os.path.isfile(candidate):
      return candidate
  where = f" (included from {including})" if including else ""
  raise FileNotFoundError(f"--flagfile={path}: no such file{where}")


def _file_args(path: str) -> List[str]:
  """One flag per line, as absl reads flagfiles (comments: # and //)."""
  with open(path) as f:
    return [line.strip() for line in f
            if line.strip() and not line.strip().startswith(("#", "//"))]


def expand(argv: Sequence[str], including: Optional[str] = None,
           depth: int = 0) -> List[str]:
  """`argv` with every `--flagfile=` replaced by the flags it holds."""
  if depth > _MAX_DEPTH:
    raise ValueError(f"--flagfile nesting deeper than {_MAX_DEPTH} "
                     f"(a cycle?) at {including}")
  out, args, i = [], list(argv), 0
  while i < len(args):
    arg = args[i]
    path = None
    if arg.startswith(("--flagfile=", "-flagfile=")):
      path = arg.split("=", 1)[1]
    elif arg in ("--flagfile", "-flagfile") and i + 1 < len(args):
      path, i = args[i + 1], i + 1
    if path is None:
      out.append(arg)
    else:
      found = resolve(path, including)
      out.extend(expand(_file_args(found), found, depth + 1))
    i += 1
  return out
