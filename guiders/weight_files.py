"""Where a loader node of the pack finds its .safetensors files: a folder_paths entry (models/<sub>/ by default, or
the entry of extra_model_paths.yaml), then the files the pack ships in demo/weights/."""
from __future__ import annotations

from pathlib import Path

PACK_WEIGHTS = Path(__file__).resolve().parents[1] / "demo" / "weights"


class WeightFolder:
    """One kind of file: `folder_name` in folder_paths (default models/`subfolder`), the pack's `pack_files`, and
    the error class, noun and loader node its messages use."""

    def __init__(self, folder_name: str, subfolder: str, pack_files: tuple[str, ...], error: type, noun: str,
                 loader: str):
        self.folder_name, self.subfolder, self.pack_files = folder_name, subfolder, pack_files
        self.error, self.noun, self.loader = error, noun, loader

    def folders(self) -> list[str]:
        """folder_paths' list for this kind (registered on first use)."""
        import folder_paths
        if self.folder_name not in folder_paths.folder_names_and_paths:
            default = str(Path(folder_paths.models_dir) / self.subfolder)
            folder_paths.folder_names_and_paths[self.folder_name] = ([default], {".safetensors"})
        return list(folder_paths.get_folder_paths(self.folder_name))

    def files(self) -> list[str]:
        """Names a loader offers: files of the folders, then the pack's own."""
        import folder_paths
        self.folders()
        names = [n for n in folder_paths.get_filename_list(self.folder_name) if n.endswith(".safetensors")]
        return names + [n for n in self.pack_files if (PACK_WEIGHTS / n).is_file() and n not in names]

    def resolve(self, name: str, *, node: str | None = None) -> Path:
        """The file behind a name from `files`; a clear error naming the node, the folders and the fix."""
        import folder_paths
        self.folders()
        found = folder_paths.get_full_path(self.folder_name, name)
        if found:
            return Path(found)
        if name in self.pack_files and (PACK_WEIGHTS / name).is_file():
            return PACK_WEIGHTS / name
        raise self.error(f"{node or self.loader}: {self.noun} file '{name}' not found in {self.folders()} or the "
                         f"pack's demo/weights/; put .safetensors {self.noun}s into models/{self.subfolder}/")
