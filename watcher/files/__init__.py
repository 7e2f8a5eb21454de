"""Files on disk, before any rule or setting: the text form of names that are not UTF-8
(`pathtext`), include/exclude globs (`pathfilter`), "is this image complete?" (`imagecheck`), and
what a path is and opening only regular files (`localfile`).

May import: `watcher.errors`.
"""

from watcher.files.imagecheck import SNIFF_BYTES as SNIFF_BYTES
from watcher.files.imagecheck import ImageVerdict as ImageVerdict
from watcher.files.imagecheck import check_image_complete as check_image_complete
from watcher.files.imagecheck import check_open_image_complete as check_open_image_complete
from watcher.files.imagecheck import sniff_image_type as sniff_image_type
from watcher.files.localfile import FileKind as FileKind
from watcher.files.localfile import kind_of as kind_of
from watcher.files.localfile import open_regular_file as open_regular_file
from watcher.files.pathfilter import PathFilter as PathFilter
from watcher.files.pathtext import path_from_text as path_from_text
from watcher.files.pathtext import path_text as path_text
