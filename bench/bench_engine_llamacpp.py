#!/usr/bin/env python3
"""llama.cpp's side of ckv-bench-engine: prefill and decode speed of one GGUF.

build/bin/ckv-bench-engine (bench/bench_engine.c) runs this with --serve and drives it step by
step, so that its decode steps and ours alternate in rounds and see the same machine (the
machine is shared and its speed drifts by 2x within a minute). It can also be run by hand,
once per context:

  python3 bench/bench_engine_llamacpp.py --model M.gguf --tokens ids.txt --threads 2 \
      --ctx 512 --batches 1,8 --decode 32 --warmup 2 --stride 1031

--tokens holds whitespace-separated token ids (the C program writes the ids its own tokenizer
made); sequence s of a batch is ids[s*stride : s*stride + ctx]. Everything goes through
llama.cpp's C API (llama-cpp-python's ctypes bindings, not its Llama class), so that the Python
around each call costs microseconds against milliseconds of work:

- one llama.cpp context per batch size, n_seq_max = batch, llama.cpp's defaults otherwise (KV
  f16, flash attention off, kv_unified off: each sequence has its own KV stream, so a batch-8
  decode step attends 8 separate caches, as ours does); n_threads = n_threads_batch = --threads;
- prefill: each sequence's prompt in llama_decode calls of --chunk tokens (ours: the engine's
  prefill chunk, 512), logits of the last token only; timed per sequence, summed;
- decode: greedy (argmax), one llama_decode per step with one token of every sequence, timed
  from the call to the logits being there (llama_get_logits_ith waits for them).

Serve mode: one command per line on stdin, one JSON object per line on stdout:
  open B CTX    make the batch-B context and prefill B sequences of CTX tokens
                -> {"ok": true, "prefill_s": S, "first": [seq 0's first greedy token]}
  decode B N    N decode steps of the batch-B context
                -> {"ok": true, "ms": [per step], "tokens": [seq 0's tokens]}
  close B       frees the batch-B context -> {"ok": true}
  quit
An error gives {"ok": false, "error": "..."}. llama.cpp's own log is silenced (--verbose keeps
it); progress goes to stderr.
"""
import argparse
import ctypes
import json
import sys
import time

import numpy as np

import llama_cpp as L


@ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
def _quiet_log(level, text, user_data):
    pass


class Batch:
    """One llama.cpp context for B sequences, prefilled, with their next tokens."""

    def __init__(self, model, n_vocab, ids, args, nseq, n_ctx):
        self.n_vocab, self.nseq = n_vocab, nseq
        # room for the prompt and the decode steps a run makes (ckv-bench-engine decodes far
        # fewer than 1024 tokens per sequence); a multiple of 256 as llama.cpp pads it
        per_seq = (n_ctx + 1024 + 255) // 256 * 256
        cp = L.llama_context_default_params()
        cp.n_ctx = per_seq * nseq
        cp.n_seq_max = nseq
        cp.n_batch = max(cp.n_batch, args.chunk, nseq)
        cp.n_threads = args.threads
        cp.n_threads_batch = args.threads
        cp.flash_attn = args.flash_attn
        self.ctx = L.llama_init_from_model(model, cp)
        if not self.ctx:
            raise RuntimeError("llama_init_from_model failed (n_ctx %d, n_seq_max %d)"
                               % (cp.n_ctx, nseq))
        self.batch = L.llama_batch_init(max(args.chunk, nseq), 0, 1)
        self.pos = [n_ctx] * nseq
        self.prefill_s = 0.0
        self.next = []
        for s in range(nseq):
            prompt = ids[s * args.stride: s * args.stride + n_ctx]
            if len(prompt) != n_ctx:
                raise RuntimeError("--tokens holds too few ids for sequence %d" % s)
            t_seq = 0.0
            for o in range(0, n_ctx, args.chunk):
                part = prompt[o: o + args.chunk]
                last = o + len(part) == n_ctx
                self._fill(part, range(o, o + len(part)), [s] * len(part),
                           [last and i == len(part) - 1 for i in range(len(part))])
                t0 = time.perf_counter()
                rc = L.llama_decode(self.ctx, self.batch)
                if last and rc == 0:
                    L.llama_get_logits_ith(self.ctx, len(part) - 1)  # waits for the result
                t_seq += time.perf_counter() - t0
                if rc != 0:
                    raise RuntimeError("llama_decode (prefill) returned %d" % rc)
            self.next.append(self._argmax(len(part) - 1))
            self.prefill_s += t_seq
            self.first = self.next[0]
            print("llama.cpp: ctx %d batch %d: sequence %d prefilled in %.2f s (%.0f tok/s)"
                  % (n_ctx, nseq, s, t_seq, n_ctx / t_seq), file=sys.stderr, flush=True)

    def _fill(self, toks, pos, seq_ids, want_logits):
        b = self.batch
        for i, t in enumerate(toks):
            b.token[i] = t
            b.pos[i] = pos[i]
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = seq_ids[i]
            b.logits[i] = 1 if want_logits[i] else 0
        b.n_tokens = len(toks)

    def _argmax(self, i):
        p = L.llama_get_logits_ith(self.ctx, i)
        return int(np.ctypeslib.as_array(p, shape=(self.n_vocab,)).argmax())

    def decode(self, steps):
        """steps greedy decode steps; returns (seconds per step, seq 0's new tokens)."""
        ms, gen = [], []
        for _ in range(steps):
            self._fill(self.next, self.pos, range(self.nseq), [True] * self.nseq)
            t0 = time.perf_counter()
            rc = L.llama_decode(self.ctx, self.batch)
            if rc == 0:
                L.llama_get_logits_ith(self.ctx, self.nseq - 1)
            dt = time.perf_counter() - t0
            if rc != 0:
                raise RuntimeError("llama_decode (decode) returned %d" % rc)
            ms.append(1000.0 * dt)
            self.pos = [p + 1 for p in self.pos]
            self.next = [self._argmax(i) for i in range(self.nseq)]
            gen.append(self.next[0])
        return ms, gen

    def close(self):
        if self.ctx:
            L.llama_batch_free(self.batch)
            L.llama_free(self.ctx)
            self.ctx = None


def serve(model, n_vocab, ids, args):
    open_batches = {}
    for line in sys.stdin:
        w = line.split()
        if not w:
            continue
        try:
            if w[0] == "quit":
                break
            if w[0] == "open" and len(w) == 3:
                b, n_ctx = int(w[1]), int(w[2])
                if b in open_batches:
                    open_batches.pop(b).close()
                bt = Batch(model, n_vocab, ids, args, b, n_ctx)
                open_batches[b] = bt
                rep = {"ok": True, "prefill_s": bt.prefill_s, "first": [bt.first]}
            elif w[0] == "decode" and len(w) == 3 and int(w[1]) in open_batches:
                ms, gen = open_batches[int(w[1])].decode(int(w[2]))
                rep = {"ok": True, "ms": ms, "tokens": gen}
            elif w[0] == "close" and len(w) == 2:
                bt = open_batches.pop(int(w[1]), None)
                if bt:
                    bt.close()
                rep = {"ok": True}
            else:
                rep = {"ok": False, "error": "bad command: %s" % line.strip()}
        except (RuntimeError, ValueError) as e:
            rep = {"ok": False, "error": str(e)}
        print(json.dumps(rep), flush=True)
    for bt in open_batches.values():
        bt.close()


def once(model, n_vocab, ids, args):
    out = {"ctx": args.ctx, "n_threads": args.threads, "flash_attn": bool(args.flash_attn),
           "decode_steps": args.decode, "warmup_steps": args.warmup}
    for b in [int(x) for x in args.batches.split(",") if x]:
        bt = Batch(model, n_vocab, ids, args, b, args.ctx)
        try:
            _, gen = bt.decode(args.warmup)
            ms, gen2 = bt.decode(args.decode)
        finally:
            bt.close()
        srt = sorted(ms)
        out["b%d_prefill_tps" % b] = b * args.ctx / bt.prefill_s
        out["b%d_prefill_s" % b] = bt.prefill_s
        out["b%d_decode_tps" % b] = b * len(ms) * 1000.0 / sum(ms)
        out["b%d_step_ms_p50" % b] = srt[len(srt) // 2]
        out["b%d_tokens" % b] = [bt.first] + gen + gen2
    print(json.dumps(out))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--tokens", required=True, help="file of whitespace-separated token ids")
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--stride", type=int, default=0, help="ids between sequences' starts")
    ap.add_argument("--chunk", type=int, default=512, help="prefill tokens per llama_decode")
    ap.add_argument("--flash-attn", action="store_true", help="llama.cpp's flash attention")
    ap.add_argument("--verbose", action="store_true", help="keep llama.cpp's log")
    ap.add_argument("--serve", action="store_true", help="commands on stdin (see above)")
    ap.add_argument("--ctx", type=int, default=512, help="prompt tokens per sequence")
    ap.add_argument("--batches", default="1", help="batch sizes, comma-separated")
    ap.add_argument("--decode", type=int, default=32, help="timed decode steps")
    ap.add_argument("--warmup", type=int, default=2, help="untimed decode steps first")
    args = ap.parse_args()
    if args.ctx < 1 or args.decode < 1 or args.warmup < 0 or args.chunk < 1 or args.threads < 1:
        ap.error("--ctx, --decode, --chunk, --threads must be positive, --warmup >= 0")
    with open(args.tokens) as f:
        ids = [int(t) for t in f.read().split()]

    if not args.verbose:
        L.llama_log_set(_quiet_log, ctypes.c_void_p(0))
    L.llama_backend_init()
    model = L.llama_model_load_from_file(args.model.encode(), L.llama_model_default_params())
    if not model:
        print("llama.cpp cannot load %s" % args.model, file=sys.stderr)
        return 1
    n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
    print("llama.cpp: llama-cpp-python %s, %s" % (getattr(L, "__version__", "?"),
          L.llama_print_system_info().decode(errors="replace").strip()), file=sys.stderr)
    try:
        if args.serve:
            serve(model, n_vocab, ids, args)
        else:
            once(model, n_vocab, ids, args)
    except RuntimeError as e:
        print("llama.cpp: %s" % e, file=sys.stderr)
        return 1
    finally:
        L.llama_model_free(model)
    return 0


if __name__ == "__main__":
    sys.exit(main())
