"""``gqaprune push DIR --repo-id ID [--private]``: publish a checkpoint folder to the Hugging Face Hub.

Through ``huggingface_hub`` (create the repo if needed, then upload the folder, model card
included). gqaprune's own bookkeeping (the manifest, hidden temporaries) is not uploaded.
Where the Hub is unreachable (offline mode, no network, no token) it fails with a message
that says which, before anything is half-uploaded.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from gqaprune.errors import GQAPruneError
from gqaprune.options import Args, opt
from gqaprune.outputs import MANIFEST

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")


@dataclass
class PushOptions(Args):
    folder: str | None = opt(None, "checkpoint folder to publish (a prune or merge output)")
    repo_id: str | None = opt(None, "Hub repository, owner/name (created if it does not exist)")
    private: bool = opt(False, "create the repository as private")
    commit_message: str = opt("Upload pruned checkpoint (gqaprune)", "the commit message on the Hub")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.repo_id or not REPO_ID.match(self.repo_id):
            raise GQAPruneError(f"--repo-id {self.repo_id!r}: give the Hub repository as owner/name, e.g. "
                                "my-org/smollm2-135m-pruned-20")
        folder = Path(self.folder or "").expanduser()
        if not self.folder or not (folder / "config.json").is_file():
            raise GQAPruneError(f"push {self.folder}: not a checkpoint folder (no config.json); give a gqaprune "
                                "prune or merge output")


def push(opts: PushOptions) -> str:
    """Create ``opts.repo_id`` (if needed) and upload ``opts.folder``; returns the repository URL."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError, OfflineModeIsEnabled

    api = HfApi()
    try:
        url = api.create_repo(opts.repo_id, private=opts.private, exist_ok=True, repo_type="model")
        api.upload_folder(folder_path=str(Path(opts.folder).expanduser()), repo_id=opts.repo_id, repo_type="model",
                          commit_message=opts.commit_message, ignore_patterns=[MANIFEST, ".*"])
    except OfflineModeIsEnabled as e:
        raise GQAPruneError(f"push --repo-id {opts.repo_id}: the Hub is offline here (HF_HUB_OFFLINE is set); "
                            "unset it on a machine with network access and push again") from e
    except LocalTokenNotFoundError as e:
        raise GQAPruneError(f"push --repo-id {opts.repo_id}: no Hugging Face token; log in with `hf auth login` "
                            "or set HF_TOKEN, then push again") from e
    except HfHubHTTPError as e:
        raise GQAPruneError(f"push --repo-id {opts.repo_id}: the Hub refused it ({str(e).splitlines()[0]}); check "
                            "the token's write access and the repository name") from e
    except OSError as e:   # no network: connection errors and time-outs
        raise GQAPruneError(f"push --repo-id {opts.repo_id}: the Hub is unreachable ({type(e).__name__}: "
                            f"{str(e)[:200]}); push again from a machine with network access") from e
    return str(url)
