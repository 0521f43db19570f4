"""``dsv3 generate``: text from a trained model, printed as it is produced.

    dsv3 generate --ckpt_path runs/tiny/version_0/checkpoints/last.ckpt --prompt "def main("
    dsv3 generate --ckpt_path hf_dir/ --prompt "import" --temperature 0.8 --top_p 0.95 --stop "\\n\\n"
    dsv3 generate --ckpt_path runs/ep/version_0/checkpoints/last.ckpt/ --prompt "def"   # sharded directory
    dsv3 generate --ckpt_path runs/finetune_tiny_hf/ --chat true --prompt "What does json.dumps do?"

``--chat true`` asks a fine-tuned model: the prompt becomes the user's message (after ``--system``'s, if
given), written with the model's chat template (the one its fine-tuning trained on, stored in its
checkpoint and exported into ``tokenizer_config.json``) and its generation prompt, and the answer
stops at the template's end-of-sequence token.

Greedy by default. With a checkpoint trained with multi-token prediction, greedy decoding is
self-speculative (the MTP modules draft, the main model verifies: the same text, fewer main-model
forwards) unless ``--speculative false``. The tokenizer is the one saved in the Lightning checkpoint
(a file, or a sharded checkpoint directory, whose model tensors alone are read),
or ``tokenizer.json`` in a Hugging Face directory, or ``--tokenizer``. The rate and the acceptance
of the drafts go to stderr, the text to stdout.
"""

from __future__ import annotations

import sys
import time

import torch

from dsv3_lightning.generation import Sampling, generate
from dsv3_lightning.loading import LoadedModel, load_trained
from dsv3_lightning.tokenizer import EOS_TOKEN


class TextStream:
    """Prints the decoded continuation as tokens arrive and watches for a stop string.

    Byte-level BPE tokens can end inside a UTF-8 character, so the text is re-decoded from the first
    new token each time and printed up to its last complete character.
    """

    def __init__(self, tokenizer, stop: str | None, out=sys.stdout) -> None:
        self.tokenizer, self.stop, self.out = tokenizer, stop, out
        self.ids: list[int] = []
        self.printed = ""

    def __call__(self, token: torch.Tensor) -> bool:
        self.ids.append(int(token[0]))
        text = self.tokenizer.decode(self.ids, skip_special_tokens=False)
        stopped = self.stop is not None and self.stop in text
        if stopped:
            text = text[: text.index(self.stop)]
        elif text.endswith("\ufffd"):
            return False
        self.out.write(text[len(self.printed):])
        self.out.flush()
        self.printed = text
        return stopped


def run(
    ckpt_path: str,
    prompt: str,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop: str | None = None,
    seed: int = 0,
    speculative: bool | None = None,
    tokenizer: str | None = None,
    chat: bool = False,
    system: str | None = None,
) -> list[int]:
    """Generate a continuation of a prompt.

    Args:
        ckpt_path: A Lightning checkpoint from dsv3 fit (a .ckpt file, or the directory of a sharded
            checkpoint), or a Hugging Face model directory.
        prompt: The text to continue.
        max_new_tokens: At most this many tokens are generated.
        temperature: 0 is greedy decoding; above 0, sampling from softmax(logits / temperature).
        top_k: Sample only among the k most likely tokens.
        top_p: Sample only among the most likely tokens whose probability reaches top_p (nucleus).
        stop: Stop when the generated text contains this string (it is not printed).
        seed: Seed of the sampling generator.
        speculative: Self-speculative decoding with the checkpoint's MTP modules (greedy only); by
            default on when the checkpoint has them and temperature is 0.
        tokenizer: A tokenizer.json to use instead of the checkpoint's.
        chat: The prompt is a user's message to a fine-tuned model, written in its chat template.
        system: A system message before the user's (with ``--chat``).

    Returns the generated token ids (the prompt excluded).
    """
    loaded = load_trained(ckpt_path, tokenizer_path=tokenizer)
    if loaded.tokenizer is None:
        raise ValueError(
            f"{ckpt_path} carries no tokenizer; pass --tokenizer path/to/tokenizer.json (a run's tokenizer is "
            "in its Lightning checkpoints; `dsv3 convert` copies it into the Hugging Face directory)"
        )
    model, tok = loaded.model, loaded.tokenizer
    if chat:
        prompt, stop = chat_prompt(loaded, prompt, system), stop or loaded.chat.eos_token or None
    elif system is not None:
        raise ValueError("--system is a message of a conversation: add --chat true")
    prompt_ids = tok.encode(prompt, add_special_tokens=False).ids
    if not prompt_ids:
        raise ValueError("--prompt is empty: give at least one character of text to continue")
    limit = model.config.max_position_embeddings
    if len(prompt_ids) >= limit:
        raise ValueError(
            f"--prompt is {len(prompt_ids)} tokens long, but the model has max_position_embeddings={limit}; "
            "shorten the prompt"
        )
    max_new_tokens = min(max_new_tokens, limit - len(prompt_ids))
    input_ids = torch.tensor([prompt_ids])
    drafting = [h for h in loaded.heads if h.can_draft]
    if speculative and not drafting:
        raise ValueError(f"--speculative true needs a checkpoint with MTP modules; {ckpt_path} has none")
    if speculative and temperature > 0:
        raise ValueError("--speculative true decodes greedily; set --temperature 0 or --speculative false")
    use_drafts = bool(drafting) and temperature == 0 and speculative is not False
    stream = TextStream(tok, stop)
    sys.stdout.write(prompt)
    start = time.perf_counter()
    if use_drafts:
        head = drafting[0]
        max_new_tokens = min(max_new_tokens, limit - len(prompt_ids) - head.depth)
        ids, stats = head.speculative_generate(model, input_ids, max_new_tokens, on_token=stream)
        note = "; draft acceptance by depth: " + ", ".join(f"{a:.0%}" for a in stats.acceptance())
    else:
        eos = tok.token_to_id(EOS_TOKEN)
        sampling = Sampling(temperature, top_k, top_p)
        ids = generate(model, input_ids, max_new_tokens, sampling=sampling, on_token=stream,
                       stop_token_ids=[eos] if eos is not None else [],
                       generator=torch.Generator().manual_seed(seed))
        note = ""
    seconds = time.perf_counter() - start
    new = ids[0, len(prompt_ids):].tolist()
    sys.stdout.write("\n")
    print(f"{len(new)} tokens in {seconds:.2f} s ({len(new) / seconds:.1f} tokens/s){note}", file=sys.stderr)
    return new


def chat_prompt(loaded: LoadedModel, message: str, system: str | None) -> str:
    """The user's ``message`` (after ``system``'s) in the model's chat template, with its generation prompt."""
    if loaded.chat is None:
        raise ValueError(
            f"{loaded.source} has no chat template: --chat true needs a model fine-tuned on conversations "
            "(data.conversations), or a Hugging Face directory with chat_template.jinja or a chat_template "
            "in tokenizer_config.json"
        )
    messages = [{"role": "system", "content": system}] if system is not None else []
    messages.append({"role": "user", "content": message})
    return loaded.chat.render(messages, add_generation_prompt=True)


def main(argv: list[str]) -> None:
    from jsonargparse import CLI

    CLI(run, args=argv, as_positional=False)


__all__ = ["TextStream", "run"]
