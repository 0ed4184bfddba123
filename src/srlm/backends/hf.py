"""The transformers backend: a transformers model in this process, on CPU or GPU."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..progress import tokens_sampled
from . import Completion, Request, SamplingParams


def render(tokenizer, request: Request) -> str:
    """The text a model sees: chat messages through the model's chat template (which writes any BOS token itself);
    raw text after the BOS token the tokenizer begins a text with, if it adds one (Llama, Mistral and Gemma models
    degrade without it), since the backends tokenize rendered text without adding special tokens."""
    if isinstance(request, str):
        bos = tokenizer.bos_token_id
        begins = bos is not None and tokenizer("", add_special_tokens=True).input_ids[:1] == [bos]
        return (tokenizer.bos_token if begins else "") + request
    return tokenizer.apply_chat_template(request, tokenize=False, add_generation_prompt=True)


def scoring_texts(tokenizer, requests: Sequence[Request], prefill: str | Sequence[str]) -> list[str]:
    """Each request as the model sees it, followed by its `prefill` (one for all, or one per request): the texts
    whose next token `choice_probs` scores."""
    prefills = [prefill] * len(requests) if isinstance(prefill, str) else list(prefill)
    if len(prefills) != len(requests):
        raise ValueError(f"{len(prefills)} prefills for {len(requests)} requests: one for all, or one each")
    return [render(tokenizer, r) + p for r, p in zip(requests, prefills)]


def sub_batch_seed(seed: int, part: int) -> int:
    """The seed of a call's `part`-th pass of at most batch_size rows. The first is the call's seed; the others are
    hashed from it: as `seed + part * batch_size` they were the seeds of other calls (a stage seeds its batches
    `seed + b`), so two texts could be sampled from one stream, the same judgment twice."""
    if part == 0:
        return seed
    import numpy as np

    return int(np.random.SeedSequence([seed & (2**64 - 1), part]).generate_state(1, np.uint64)[0] >> 1)


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """`text` cut before the earliest occurrence of any stop string, and whether there was one."""
    cuts = [cut for cut in (text.find(s) for s in stop if s) if cut >= 0]
    return (text[: min(cuts)], True) if cuts else (text, False)


def stop_window(tokens: list[int], window: int, silent: set[int]) -> list[int]:
    """The shortest tail of `tokens` holding `window` tokens that are not in `silent` (special tokens, which decode
    to nothing): a stop string that may have just ended lies within it, even with pads or markers inside it."""
    start, need = len(tokens), window
    while start > 0 and need > 0:
        start -= 1
        need -= tokens[start] not in silent
    return tokens[start:]


def eos_token_ids(tokenizer, *declared) -> list[int]:
    """Every token id that ends a sequence, each once: those the model's files declare (`declared`: an id, a list of
    ids or None, e.g. generation_config.json's, which may name the chat turn's end as well as the text's, as
    Qwen2.5's `<|im_end|>` and `<|endoftext|>`), then the tokenizer's own."""
    ids: list[int] = []
    for value in (*declared, tokenizer.eos_token_id):
        for i in value if isinstance(value, (list, tuple)) else [value]:
            if i is not None and i not in ids:
                ids.append(i)
    return ids


def _not_empty(texts: list[str]) -> list[str]:
    """`texts`, refused if one is empty: a model continues a text, and there would be none to attend to."""
    empty = [i for i, t in enumerate(texts) if not t]
    if empty:
        raise ValueError(f"request {empty[0]} is empty text (of {len(empty)} empty): there is nothing to continue")
    return texts


def choice_tokens(tokenizer, text: str, choices: Sequence[str]) -> tuple[list[int], list[int]]:
    """(tokens every choice starts with, the one distinct token of each choice) after `text`.

    The choices may share leading tokens (" 3" is " " + "3" for SmolLM2, one token for Llama 3): those go into the
    prompt, and each choice must then be one token of its own."""
    encode = lambda t: tokenizer(t, add_special_tokens=False).input_ids
    base = encode(text)
    tails = []
    for choice in choices:
        full = encode(text + choice)
        if full[: len(base)] != base:
            raise ValueError(f"the tokenizer merges {choice!r} into the text before it; cannot score choices")
        tails.append(full[len(base) :])
    shared: list[int] = []
    while all(len(t) > 1 for t in tails) and len({t[0] for t in tails}) == 1:
        shared.append(tails[0][0])
        tails = [t[1:] for t in tails]
    if any(len(t) != 1 for t in tails) or len({t[0] for t in tails}) != len(tails):
        raise ValueError(f"choices {list(choices)} are not one distinct token each after a shared start")
    return shared, [t[0] for t in tails]


def sample_tokens(logits, temperature: float, top_p: float, generator, shortlist: int = 256):
    """One token per row of `logits` (batch, vocabulary): greedy at temperature 0, else temperature then top-p.

    The distribution of transformers' temperature and top-p warpers followed by multinomial sampling (the smallest
    set of most likely tokens whose probability reaches `top_p`), computed on the `shortlist` most likely tokens
    when their probability already reaches `top_p` (almost always) and on the whole vocabulary otherwise: sorting
    the whole vocabulary, and drawing a random number per entry, cost more than the model's forward pass on a
    CPU. Random numbers come from `generator`, so a batch's samples depend only on its seed.
    """
    import torch

    if temperature <= 0:
        return logits.argmax(-1)
    scaled = logits.float().div_(temperature)
    if top_p >= 1.0:
        return torch.multinomial(torch.softmax(scaled, -1), 1, generator=generator)[:, 0]
    tokens = torch.empty(len(scaled), dtype=torch.long, device=scaled.device)
    log_z = torch.logsumexp(scaled, -1, keepdim=True)
    left = torch.arange(len(scaled), device=scaled.device)
    vocabulary = scaled.shape[-1]
    for k in (min(shortlist, vocabulary), vocabulary):
        rows = scaled if len(left) == len(scaled) else scaled[left]
        # The whole vocabulary in order: a sort, which is what topk does for so large a k, but slower (10% on a CPU;
        # several times on a GPU, pytorch/pytorch#22812).
        values, index = rows.topk(k, dim=-1) if k < vocabulary else rows.sort(dim=-1, descending=True)
        probs = (values - log_z[left]).exp()
        before = probs.cumsum(-1) - probs
        if k < vocabulary:
            covered = before[:, -1] + probs[:, -1] >= top_p * (1 - 1e-6)
        else:
            covered = torch.ones(len(left), dtype=torch.bool, device=scaled.device)
        if covered.any():
            weights = torch.where(before < top_p, probs, 0.0)[covered]
            picked = torch.multinomial(weights, 1, generator=generator)
            tokens[left[covered]] = index[covered].gather(1, picked)[:, 0]
        left = left[~covered]
        if not len(left):
            break
    return tokens


def _growing_layer_class():
    from transformers.cache_utils import DynamicLayer

    class GrowingLayer(DynamicLayer):
        """A key/value cache layer that writes new tokens into spare capacity (doubling when full) and hands out
        views, instead of concatenating the whole cache at every step: that copy was a quarter of a decoding step's
        time at batch 128 (bench/speed.py). `room`, where the caller knows it, is the number of tokens to leave
        room for beyond the first update, so that the first allocation is the last. `offset`: tokens that precede
        these and are held elsewhere (a decoding batch's prompts, in `cascade.SharedRows`)."""

        def __init__(self, room: int | None = None, offset: int = 0):
            super().__init__()
            self.room, self.offset = room, offset

        def get_seq_length(self) -> int:
            return self.offset + (self._n if self.is_initialized else 0)

        def adopt(self, keys, values, n: int) -> None:
            """Take `keys` and `values` (batch, heads, capacity, dim), their first `n` positions filled, as storage."""
            self.lazy_initialization(keys, values)
            self._k, self._v, self._n = keys, values, n
            self.keys, self.values = keys[:, :, :n], values[:, :, :n]

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
                self._k = self._v = None
                self._n = 0
            n, new = self._n, key_states.shape[-2]
            if self._k is None or n + new > self._k.shape[-2]:
                batch, heads, _, dim = key_states.shape
                capacity = max(64, 2 * (n + new)) if self.room is None else n + new + self.room
                self.room = None
                k, v = key_states.new_empty(batch, heads, capacity, dim), value_states.new_empty(batch, heads,
                                                                                                 capacity, dim)
                if n:
                    k[:, :, :n], v[:, :, :n] = self._k[:, :, :n], self._v[:, :, :n]
                self._k, self._v = k, v
            self._k[:, :, n : n + new], self._v[:, :, n : n + new] = key_states, value_states
            self._n = n + new
            self.keys, self.values = self._k[:, :, : self._n], self._v[:, :, : self._n]
            return self.keys, self.values

        def batch_select_indices(self, indices):
            if self.is_initialized and self._n:
                # Copy the filled part and a little room, not the spare capacity (up to as much again).
                keep = min(self._k.shape[-2], self._n + max(64, self._n // 8))
                self._k = self._k[:, :, :keep].index_select(0, indices)
                self._v = self._v[:, :, :keep].index_select(0, indices)
                self.keys, self.values = self._k[:, :, : self._n], self._v[:, :, : self._n]

        def batch_repeat_interleave(self, repeats: int):
            if self.is_initialized and self._n:
                self._k, self._v = self._k.repeat_interleave(repeats, 0), self._v.repeat_interleave(repeats, 0)
                self.keys, self.values = self._k[:, :, : self._n], self._v[:, :, : self._n]

    return GrowingLayer


# Rows prefilled in one scoring pass, in tokens after the shared prefix (pads included). A scoring pass is all prefill,
# whose throughput stops growing long before this; what a larger batch adds is padding up to its longest row. On a
# CPU, smaller passes are also faster per token, their activations staying in cache: 48 judge prompts took 14-16 s in
# passes of 1024 tokens and 17-19 s in passes of 4096 (2-core Zen 4, bf16). A GPU wants passes as large as memory allows.
PREFILL_TOKENS = {"cpu": 1024}
PREFILL_TOKENS_DEFAULT = 16384


def length_groups(lengths: Sequence[int], max_rows: int, max_tokens: int) -> list[list[int]]:
    """Indices grouped shortest first, each group at most `max_rows` rows and `max_tokens` tokens once padded to its
    longest row (a row longer than that is a group of its own)."""
    groups: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lengths.__getitem__):
        if groups and len(groups[-1]) < max_rows and (len(groups[-1]) + 1) * lengths[i] <= max_tokens:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


class HFGenerator:
    """transformers backend: the model's own forward pass and key/value cache, in this process, on CPU or GPU.

    The decoding loop is srlm's rather than `model.generate`'s, for speed on small models (bench/speed.py): a batch
    is prefilled once (identical prompts, such as a candidate's N samples, once for all; the text every prompt
    starts with, such as the judge rubric, once per stage), the cache grows in place, rows that finished leave the
    batch, and sampling avoids full-vocabulary sorts. Tokens, stop strings and end-of-sequence handling are those of
    `generate` (the same samples are not: the random streams differ).
    """

    def __init__(self, model_path: Path | str, model_config, device: str, batch_size: int = 16, dtype: str | None = None):
        from ..models import load_model, load_tokenizer

        self.tokenizer = load_tokenizer(model_path, model_config)
        self.tokenizer.padding_side = "left"
        if dtype is not None:
            model_config = model_config.model_copy(update={"dtype": dtype})
        self.model = load_model(model_path, model_config, device).eval()
        self.device = device
        self.batch_size = batch_size
        self.prefill_tokens = PREFILL_TOKENS.get(device.split(":")[0], PREFILL_TOKENS_DEFAULT)
        self.eos_ids = eos_token_ids(self.tokenizer, self.model.generation_config.eos_token_id)
        self._silent_ids = set(self.tokenizer.all_special_ids)
        self._prefix_cache: tuple[list[int], list] | None = None
        config = self.model.config
        # Sliding-window or hybrid attention needs transformers' own cache layers, which know the window.
        sliding = getattr(config, "sliding_window", None) or any(
            t != "full_attention" for t in (getattr(config, "layer_types", None) or []))
        self._layer_class = None if sliding else _growing_layer_class()
        # Rows that continue the same prompt (k judgments, N candidates) share its keys and values while decoding
        # (`cascade`), on a CPU: 1.2-1.3x faster sampled judging in fp32, 1.25-1.45x in bf16 on a CPU with AMX
        # (bench/README.md). On a GPU it is unmeasured, and sdpa's kernels there are another matter.
        from .cascade import MODEL_TYPES, register

        self._cascade = (self._layer_class is not None and device == "cpu"
                         and str(self.model.dtype) in ("torch.float32", "torch.bfloat16")  # fp16: not measured
                         and config.model_type in MODEL_TYPES and config._attn_implementation == "sdpa")
        if self._cascade:
            self.model.set_attn_implementation(register())
        # transformers renamed forward's `past_key_values` to `cache` (5.2x); pass whichever this version takes.
        import inspect

        self._cache_kw = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"

    def render(self, request: Request) -> str:
        return render(self.tokenizer, request)

    def generate(self, requests: Sequence[Request], params: SamplingParams) -> list[Completion]:
        import torch

        texts = _not_empty([self.render(r) for r in requests])
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        results: list[Completion | None] = [None] * len(texts)
        for part, start in enumerate(range(0, len(order), self.batch_size)):
            idx = order[start : start + self.batch_size]
            generator = None
            if params.temperature > 0:
                generator = torch.Generator(self.device).manual_seed(sub_batch_seed(params.seed, part))
            with torch.inference_mode():
                rows = self._decode([texts[i] for i in idx], params, generator)
            for i, (tokens, ended, logprobs) in zip(idx, rows):
                results[i] = self._completion(tokens, ended, logprobs, params)
        return results  # type: ignore[return-value]

    def _new_cache(self, room: int | None = None):
        """An empty cache; `room`: the tokens it will hold beyond the first update, where known (`GrowingLayer`)."""
        from transformers import DynamicCache
        from transformers.cache_utils import Cache

        if self._layer_class is None:
            return DynamicCache(config=self.model.config)
        return Cache(layer_class_to_replicate=lambda: self._layer_class(room))

    def _prefill(self, texts: list[str], room: int):
        """Encode a batch, with room in its cache for `room` more tokens: (cache, logits of each row's last token,
        attention mask, next position per row, the index in `texts` of each row, `SharedRows` or None).

        Identical texts are encoded once and their cache rows copied; the text all of them start with is encoded
        once per stage (kept in `_prefix_cache`) and shared. Pads sit between that prefix and each row's rest,
        masked, with positions that skip them, so every row's last token is in the last column. Rows are prefilled
        in passes of rows of like length (`length_groups`), whose caches are then laid side by side: one pass
        padding every row to the longest spent 40% of the prefill of 256 chat prompts, in batches of 64, on pads
        (bench/speed.py). With the cascade (`_cascade`) and repeated texts, the prompts stay in `SharedRows`, one
        copy each, and the cache returned is empty but for room for what rows decode."""
        import torch

        unique = list(dict.fromkeys(texts))
        prefix, rows = self._tokenize(unique)
        number = {t: u for u, t in enumerate(unique)}
        texts_of: list[list[int]] = [[] for _ in unique]  # unique row -> the texts that are it
        for i, t in enumerate(texts):
            texts_of[number[t]].append(i)
        groups = length_groups([len(r) for r in rows], len(rows), self.prefill_tokens)
        if len(groups) == 1 and len(unique) == len(texts):
            return *self._encode(prefix, rows, room), list(range(len(texts))), None
        if self._layer_class is None:
            # transformers' own cache layers (sliding-window models) keep what one padded pass gives them.
            cache, logits, mask, following = self._encode(prefix, rows, room)
            select = torch.tensor([number[t] for t in texts], device=self.device)
            cache.batch_select_indices(select)
            return cache, logits[select], mask[select], following[select], list(range(len(texts))), None
        if not self._cascade or len(unique) == len(texts):
            return *self._side_by_side(prefix, rows, groups, texts_of, room), None
        from transformers.cache_utils import Cache

        from .cascade import SharedRows

        # Each distinct prompt prefilled once and kept once (no room: rows decode into their own cache).
        once = [[u] for u in range(len(unique))]
        prompts, logits, mask, following, order = self._side_by_side(prefix, rows, groups, once, 0)
        counts = torch.tensor([len(texts_of[u]) for u in order], device=self.device)
        row_of = torch.repeat_interleave(torch.arange(len(order), device=self.device), counts)
        shared = SharedRows([layer.keys for layer in prompts.layers], [layer.values for layer in prompts.layers],
                            mask.bool(), row_of, prefix=len(prefix))
        cache = Cache(layers=[self._layer_class(room, offset=mask.shape[1]) for _ in prompts.layers])
        return cache, logits[row_of], mask[row_of], following[row_of], [t for u in order for t in texts_of[u]], shared

    def _side_by_side(self, prefix: list[int], rows: list[list[int]], groups: list[list[int]],
                      texts_of: list[list[int]], room: int):
        """`_prefill`'s result from one `_encode` pass per group of `rows`, each row repeated for each of its texts:
        the batch is in group order, and a row's copies are next to each other. Copying each pass's cache into place
        here is the only copy: reordering rows afterwards (`batch_select_indices`) took a tenth of the prefill."""
        import torch

        parts = [self._encode(prefix, [rows[u] for u in idx]) for idx in groups]
        counts = [[len(texts_of[u]) for u in idx] for idx in groups]
        repeats = [torch.tensor(c, device=self.device) if max(c) > 1 else None for c in counts]
        copies = lambda x, g: x if repeats[g] is None else x.repeat_interleave(repeats[g], dim=0)
        row_texts = [t for idx in groups for u in idx for t in texts_of[u]]
        lengths = torch.tensor([len(rows[u]) for idx in groups for u in idx for _ in texts_of[u]], device=self.device)
        n, p, width = len(row_texts), len(prefix), max(len(r) for r in rows)
        logits = torch.cat([copies(part[1], g) for g, part in enumerate(parts)])
        mask = (torch.arange(p + width, device=self.device) >= p + width - lengths[:, None]).long()
        mask[:, :p] = 1
        layers = []
        for pieces in zip(*(part[0].layers for part in parts)):
            _, heads, _, dim = pieces[0].keys.shape
            keys = pieces[0].keys.new_empty(n, heads, p + width + room, dim)
            values = pieces[0].values.new_empty(n, heads, p + width + room, dim)
            start = 0
            for g, piece in enumerate(pieces):
                k, v = copies(piece.keys, g), copies(piece.values, g)
                end, own = start + len(k), k.shape[-2] - p
                keys[start:end, :, :p], values[start:end, :, :p] = k[:, :, :p], v[:, :, :p]
                # Zeros under the pads, not whatever the memory held: masked scores are dropped, but a NaN there
                # would survive the product of its zero probability with its value.
                rest = p + width - own  # where the row's own tokens start
                keys[start:end, :, p:rest], values[start:end, :, p:rest] = 0, 0
                keys[start:end, :, rest : p + width], values[start:end, :, rest : p + width] = k[:, :, p:], v[:, :, p:]
                start = end
                piece.keys = piece.values = piece._k = piece._v = None  # its memory goes as the batch's comes
            layers.append(self._layer_class())
            layers[-1].adopt(keys, values, p + width)
        from transformers.cache_utils import Cache

        return Cache(layers=layers), logits, mask, p + lengths, row_texts

    def _encode(self, prefix: list[int], rows: list[list[int]], room: int = 0):
        """Prefill `prefix` + each row, with room in the cache for `room` more tokens: (cache, last-token logits,
        attention mask, next position per row)."""
        import torch

        width = max(len(r) for r in rows)
        cache = self._new_cache(width + room if prefix else room)  # the first update is the prefix, if any
        if prefix:
            if self._prefix_cache is None or self._prefix_cache[0] != prefix:
                encoded = self._new_cache()
                self.model(torch.tensor([prefix], device=self.device), use_cache=True, logits_to_keep=1,
                           **{self._cache_kw: encoded})
                self._prefix_cache = (prefix, [(layer.keys.clone(), layer.values.clone()) for layer in encoded.layers])
            for i, (k, v) in enumerate(self._prefix_cache[1]):
                cache.update(k.expand(len(rows), -1, -1, -1), v.expand(len(rows), -1, -1, -1), i)
        pad = self.tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=self.device)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=self.device)
        positions = len(prefix) + (mask.cumsum(-1) - 1).clamp(min=0)
        mask = torch.cat([torch.ones(len(rows), len(prefix), dtype=mask.dtype, device=self.device), mask], dim=-1)
        logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                            logits_to_keep=1, **{self._cache_kw: cache}).logits[:, -1]
        return cache, logits, mask, positions[:, -1] + 1

    def _decode(self, texts: list[str], params: SamplingParams,
                generator) -> list[tuple[list[int], bool, list[float] | None]]:
        """(new tokens without the end-of-sequence token, ended by EOS or a stop string, each token's log-probability
        if `params.logprobs`) for each text."""
        import torch

        cache, logits, mask, position, active, shared = self._prefill(texts, params.max_new_tokens)  # row -> text
        # A row that reaches the model's last position stops there, cut (truncated): past it a model with rotary
        # embeddings writes nonsense and one with learned positions fails.
        limit = getattr(self.model.config, "max_position_embeddings", None)
        if not limit or int(position.max()) + params.max_new_tokens <= limit:
            limit = None
        extra = {} if shared is None else {"cascade": shared}
        tokens_of: list[list[int]] = [[] for _ in texts]
        logprobs_of: list[list[float]] | None = [[] for _ in texts] if params.logprobs else None
        ended = [False] * len(texts)
        finished_rows: set[int] = set()  # rows still in the batch whose text is done
        eos = set(self.eos_ids)
        # Tokens to decode to find a stop string that may have just ended: a token that is not special is at least
        # one byte of text.
        window = max((len(s.encode("utf-8")) for s in params.stop), default=0) + 2
        for step in range(params.max_new_tokens):
            # The model's own distribution, before temperature and top-p (what vLLM and OpenAI report); taken before
            # sampling, which may scale fp32 logits in place.
            log_p = torch.log_softmax(logits.float(), -1) if logprobs_of is not None else None
            chosen = sample_tokens(logits, params.temperature, params.top_p, generator)
            picked = chosen.tolist()
            if log_p is not None:
                scores = log_p.gather(1, chosen[:, None])[:, 0].tolist()
            kept = 0
            for row, (text, token) in enumerate(zip(active, picked)):
                if row in finished_rows:
                    continue
                if token in eos:
                    ended[text] = True
                    finished_rows.add(row)
                    continue
                tokens_of[text].append(token)
                kept += 1
                if logprobs_of is not None:
                    logprobs_of[text].append(scores[row])
                if params.stop:
                    tail = self.tokenizer.decode(stop_window(tokens_of[text], window, self._silent_ids),
                                                 skip_special_tokens=True)
                    if any(s in tail for s in params.stop):
                        ended[text] = True
                        finished_rows.add(row)
            tokens_sampled(kept)
            if limit is not None:  # `position` is where each row's next token would go
                finished_rows.update(r for r, at in enumerate(position.tolist()) if at >= limit)
            if len(finished_rows) == len(active) or step == params.max_new_tokens - 1:
                break
            # Finished rows leave the batch once they are an eighth of it: each removal copies the cache.
            if len(finished_rows) * 8 >= len(active):
                keep = [r for r in range(len(active)) if r not in finished_rows]
                select = torch.tensor(keep, device=self.device)
                cache.batch_select_indices(select)
                if shared is not None:
                    shared.select(select)
                mask, position = mask[select], position[select]
                picked = [picked[r] for r in keep]
                active = [active[r] for r in keep]
                finished_rows = set()
            mask = torch.cat([mask, torch.ones(len(active), 1, dtype=mask.dtype, device=self.device)], dim=-1)
            logits = self.model(input_ids=torch.tensor(picked, device=self.device)[:, None], attention_mask=mask,
                                position_ids=position[:, None], use_cache=True, logits_to_keep=1,
                                **{self._cache_kw: cache}, **extra).logits[:, -1]
            position = position + 1
        return list(zip(tokens_of, ended, logprobs_of or [None] * len(texts)))

    def _completion(self, tokens: list[int], ended: bool, logprobs: list[float] | None,
                    params: SamplingParams) -> Completion:
        text, stopped = cut_at_stop(self.tokenizer.decode(tokens, skip_special_tokens=True), params.stop)
        return Completion(text=text.strip(), n_tokens=len(tokens), truncated=not (ended or stopped),
                          token_logprobs=None if logprobs is None else tuple(logprobs))

    def choice_probs(self, requests: Sequence[Request], prefill: str | Sequence[str], choices: Sequence[str], *,
                     reuse_prefix: bool = True) -> list[list[float]]:
        """P(choice | request, prefill) for each choice: one forward pass per batch, no sampling.

        `prefill` opens the assistant's turn (the judge's "Score:"). The choices may share leading tokens
        (" 3" is " " + "3" for SmolLM2, one token for Llama 3); the shared tokens are appended to the prompt
        and each choice must then be one token. With `reuse_prefix`, the text all requests begin with (the
        judge rubric, most of a judge prompt) is encoded once and its key/value cache reused by every row.
        """
        import torch

        texts = _not_empty(scoring_texts(self.tokenizer, requests, prefill))
        if not texts:
            return []
        shared, choice_ids = choice_tokens(self.tokenizer, texts[0], choices)
        prefix, rows = self._tokenize(texts, reuse_prefix)
        rows = [r + shared for r in rows]
        out: list[list[float] | None] = [None] * len(texts)
        with torch.inference_mode():
            for idx in length_groups([len(r) for r in rows], self.batch_size, self.prefill_tokens):
                _, logits, _, _ = self._encode(prefix, [rows[i] for i in idx])
                probs = torch.softmax(logits.float(), dim=-1)[:, choice_ids]
                for row, i in enumerate(idx):
                    out[i] = probs[row].tolist()
        return out  # type: ignore[return-value]

    def _tokenize(self, texts: list[str], reuse_prefix: bool = True) -> tuple[list[int], list[list[int]]]:
        """(token ids of a prefix every text shares, each text's rest): the prefix is empty unless `reuse_prefix`,
        several texts, and `_split_prefix` finds one that pays. Never with a sliding window (`_layer_class` None):
        the pads between the prefix and a shorter row would take places in the window, and transformers' sliding
        layers keep only the window's end of the prefix, so a padded row would see other tokens than alone."""
        if reuse_prefix and len(texts) > 1 and self._layer_class is not None:
            prefix, rows = self._split_prefix(texts)
        else:
            prefix, rows = [], [self.tokenizer(t, add_special_tokens=False).input_ids for t in texts]
        limit = getattr(self.model.config, "max_position_embeddings", None)
        longest = max(range(len(rows)), key=lambda i: len(rows[i]))
        if limit and len(prefix) + len(rows[longest]) > limit:
            from ..errors import ModelError

            # Past its positions a model with rotary embeddings writes nonsense and one with learned positions fails.
            raise ModelError(f"a request is {len(prefix) + len(rows[longest])} tokens, more than the model's "
                             f"{limit} positions: {texts[longest][:80]!r}...; shorten it, or use a model with a "
                             f"longer context")
        return prefix, rows

    def _split_prefix(self, texts: list[str]) -> tuple[list[int], list[list[int]]]:
        """The token ids of the text every request starts with, and of each request's rest; (no prefix, each
        whole text) when that does not pay. The cut is after a newline, and only where encoding the two parts apart gives
        the same tokens as encoding the whole (byte-level BPE merges runs of whitespace across a cut)."""
        import os.path

        encode = lambda t: self.tokenizer(t, add_special_tokens=False).input_ids
        whole = [encode(t) for t in texts]
        common = os.path.commonprefix(texts)
        cut = len(common)
        for _ in range(8):
            cut = common.rfind("\n", 0, cut)
            if cut < 0:
                break
            prefix = encode(common[: cut + 1])
            if len(prefix) < 16:
                break
            rows = [encode(t[cut + 1 :]) for t in texts]
            # Every row keeps a token of its own: its last token's logits are what a row is encoded for.
            if all(rows) and all(w == prefix + r for w, r in zip(whole, rows)):
                return prefix, rows
        return [], whole
