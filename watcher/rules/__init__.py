"""Path rules: turning a file's path inside a watch into a reference_id and metadata (globs with
`{name}` captures, regexes, templates with types).

May import: `watcher.files`, `watcher.errors`.
"""

from watcher.rules.ruleset import Classification as Classification
from watcher.rules.ruleset import CompiledWatch as CompiledWatch
from watcher.rules.ruleset import RuleFields as RuleFields
from watcher.rules.ruleset import RuleSet as RuleSet
from watcher.rules.ruleset import WatchRules as WatchRules
from watcher.rules.ruleset import compile_watch as compile_watch
