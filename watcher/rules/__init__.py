"""Path rules: a file's path (relative to its watch) -> reference_id, metadata and remote URL.

A watch has a static `metadata` table and a list of `rules`. A rule selects files either with a
glob (`match`, where `{name}` captures one path segment or part of one) or a regex (`regex`, whose
named groups are captures), and gives metadata *templates*: `"{weather}"`, `"frame {n}"`,
`"{frame:int}"`. Static metadata merges first, then every matching rule in order; later keys win.

`compile_watch` checks and compiles a watch once, at load (config keeps the result); a `RuleSet`
renders that for one file. Modules: `template` (placeholders, typed values), `glob` (globs with
captures), `compile` (a watch -> `CompiledWatch` or its problems; type conflicts across watches),
`classify` (`RuleSet.classify`), `text` (how messages spell keys and values).

May import: `watcher.files`, `watcher.errors`, `watcher.wire`.
"""

from watcher.rules.classify import Classification as Classification
from watcher.rules.classify import RuleSet as RuleSet
from watcher.rules.compile import CompiledWatch as CompiledWatch
from watcher.rules.compile import Problem as Problem
from watcher.rules.compile import RuleFields as RuleFields
from watcher.rules.compile import WatchRules as WatchRules
from watcher.rules.compile import compile_watch as compile_watch
from watcher.rules.compile import type_conflicts as type_conflicts
from watcher.rules.text import dotted_key as dotted_key
from watcher.rules.text import join_key as join_key
from watcher.rules.text import shorten as shorten
