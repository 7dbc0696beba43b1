"""Build the multi-domain corpus for the domex demo model, from offline sources only.

Eight domains of clearly different character (python, c, math, sql, english, german, spanish,
unix) plus an out-of-domain set (FASTA protein/DNA records) that no domain covers. Per domain:
a training split, a held-out eval split disjoint from training *by source file* (generated
domains: by generator seed stream), and 12 demos taken from training sources (so disjoint from
eval). Everything is deterministic given --seed.

Writes the raw corpus to --out (scratch, not the repo) and, with --ship, the shipped artefacts:
patterns/<domain>.jsonl (demos) and patterns/eval/<domain>.jsonl.gz (+ ood.jsonl.gz). With --tasks,
only the checkable tasks of `domex eval` (patterns/eval/tasks/): math problems with their exact answers
and SQL questions with their reference queries, drawn from the eval seed stream, plus the seeded rows
of the 8 tables the SQL queries run on.

    python tools/build_corpus.py --out /work/scratch/corpus --ship .
    python tools/build_corpus.py --tasks .
"""
from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import random
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

DOMAINS = ["python", "c", "math", "sql", "english", "german", "spanish", "unix"]
APT = "apt-get update && apt-get install -y fortunes fortunes-min fortunes-de fortunes-es fortunes-it man-db groff-base"
PY_LIB = Path("/root/.pyenv/versions/3.11.7/lib/python3.11")
FORTUNE_DIR = Path("/usr/share/games/fortunes")
# fortune files of the `fortunes` and `fortunes-min` packages (English); the top-level dir also
# holds links to the Italian files, so the list is explicit.
ENGLISH_FORTUNES = (
    "fortunes literature riddles art ascii-art computers cookie debian definitions disclaimer "
    "drugs education ethnic food goedel humorists kids knghtbrd law linux linuxcookie love magic "
    "medicine men-women miscellaneous news paradoxum people perl pets platitudes politics "
    "pratchett science songs-poems sports startrek tao translate-me wisdom work zippy"
).split()
MAN_SECTIONS = ["man1", "man5", "man7", "man8"]

MIN_CHARS, MAX_CHARS = 300, 760  # ~100-300 tokens with the 8k byte-level BPE (measured in the card)
EVAL_PASSAGES = 250
N_DEMOS = 12
TRAIN_CHARS = 5_000_000  # cap per domain; the trainer balances domains anyway


class SourceMissing(SystemExit):
    """A corpus source is not installed: say which and how to install it."""


@dataclass
class Split:
    train: list[str]
    eval: list[str]
    demos: list[dict]


# ---------------------------------------------------------------- passage chunking

def chunk_lines(text: str, lo: int = MIN_CHARS, hi: int = MAX_CHARS) -> list[str]:
    """Cut a document into passages at line boundaries so each lands in [lo, hi] chars."""
    out, cur, size = [], [], 0
    for line in text.splitlines():
        if len(line) > hi:
            line = line[:hi]
        if size + len(line) + 1 > hi and size >= lo:
            out.append("\n".join(cur).strip("\n"))
            cur, size = [], 0
        cur.append(line)
        size += len(line) + 1
    if size >= lo:
        out.append("\n".join(cur).strip("\n"))
    return [p for p in out if len(p.strip()) >= lo // 2]


def pack_items(items: list[str], lo: int = MIN_CHARS, hi: int = MAX_CHARS) -> list[str]:
    """Join short items (fortunes, problems) into passages of [lo, hi] chars, blank-line separated."""
    out, cur, size = [], [], 0
    for it in items:
        it = it.strip()
        if not it or len(it) > hi:
            continue
        if size + len(it) + 2 > hi and size >= lo:
            out.append("\n\n".join(cur))
            cur, size = [], 0
        cur.append(it)
        size += len(it) + 2
    if size >= lo:
        out.append("\n\n".join(cur))
    return out


def split_by_file(name: str, files: list[Path], read, rng: random.Random,
                  to_passages=chunk_lines, demo_fn=None) -> Split:
    """Assign whole source files to eval until it holds enough passages; the next files are training.

    The same text can sit in several files (e.g. a header installed under two paths), so eval is
    also cleaned of passages that occur in training or twice; when that leaves too few, it is
    topped up from files after the training cap, which training never reads.
    """
    files = sorted(files)
    rng.shuffle(files)

    def passages(f: Path) -> list[str]:
        try:
            return to_passages(read(f))
        except (UnicodeDecodeError, OSError, subprocess.SubprocessError):
            return []

    ev, tr, tr_chars, i = [], [], 0, 0
    bar = tqdm(total=len(files), desc=f"{name:8s}", leave=False)
    while i < len(files) and tr_chars < TRAIN_CHARS:
        ps = passages(files[i])
        i += 1
        bar.update(1)
        if len(ev) < EVAL_PASSAGES:  # whole files go to eval until it holds enough
            ev.extend(ps)
        else:
            tr.extend(ps)
            tr_chars += sum(map(len, ps))
    seen = set(tr)
    clean = [p for p in ev if not (p in seen or seen.add(p))]
    while len(clean) < EVAL_PASSAGES and i < len(files):  # top up from files training never read
        clean.extend(p for p in passages(files[i]) if not (p in seen or seen.add(p)))
        i += 1
        bar.update(1)
    bar.close()
    if len(clean) < EVAL_PASSAGES:
        raise SystemExit(f"{name}: only {len(clean)} clean eval passages; source too small")
    ev = rng.sample(clean, EVAL_PASSAGES)
    demos = demo_fn(tr, rng) if demo_fn else [{"text": t} for t in rng.sample(tr, N_DEMOS)]
    return Split(train=tr, eval=ev, demos=demos)


def read_text(f: Path) -> str:
    return f.read_text(encoding="utf-8")


# ---------------------------------------------------------------- file-based domains

def require(path: Path, what: str, how: str) -> None:
    if not path.exists():
        raise SourceMissing(f"missing source for {what}: {path} not found. Install it with: {how}")


def build_python(rng: random.Random) -> Split:
    require(PY_LIB, "python", "pyenv install 3.11.7 (or point PY_LIB at a CPython 3.11 Lib/ folder)")
    files = [p for p in PY_LIB.rglob("*.py") if "site-packages" not in p.parts]
    return split_by_file("python", files, read_text, rng)


def build_c(rng: random.Random) -> Split:
    require(Path("/usr/include/stdio.h"), "c", "apt-get update && apt-get install -y libc6-dev linux-libc-dev")
    files = [p for p in Path("/usr/include").rglob("*.h") if p.is_file()]
    return split_by_file("c", files, read_text, rng)


def read_fortunes(f: Path) -> list[str]:
    return [x.strip("\n") for x in f.read_text(encoding="utf-8", errors="strict").split("\n%\n")]


def fortune_split(name: str, files: list[Path], rng: random.Random) -> Split:
    return split_by_file(name, files, read_fortunes, rng, to_passages=pack_items,
                         demo_fn=lambda tr, r: [{"text": t} for t in r.sample(tr, N_DEMOS)])


def build_english(rng: random.Random) -> Split:
    require(FORTUNE_DIR / "fortunes", "english", APT)
    files = [FORTUNE_DIR / n for n in ENGLISH_FORTUNES if (FORTUNE_DIR / n).is_file()]
    return fortune_split("english", files, rng)


def build_german(rng: random.Random) -> Split:
    d = FORTUNE_DIR / "de"
    require(d, "german", APT)
    files = [p for p in d.iterdir() if p.is_file() and not p.is_symlink() and p.suffix not in (".dat", ".u8")]
    return fortune_split("german", files, rng)


def build_spanish(rng: random.Random) -> Split:
    d = FORTUNE_DIR / "es"
    require(d, "spanish", APT)
    files = sorted(d.glob("*.fortunes"))  # top level only: es/off/ is the offensive set, skipped
    return fortune_split("spanish", files, rng)


def render_man(f: Path) -> str:
    """Render one man page to plain text (no overstrike) at 80 columns."""
    env = dict(os.environ, MANWIDTH="80", LC_ALL="C.UTF-8", MAN_KEEP_FORMATTING="")
    r = subprocess.run(["man", "-l", str(f)], capture_output=True, env=env, timeout=20)
    col = subprocess.run(["col", "-bx"], input=r.stdout, capture_output=True, timeout=20)
    return col.stdout.decode("utf-8", errors="strict")


def build_unix(rng: random.Random) -> Split:
    if shutil.which("man") is None or shutil.which("col") is None:
        raise SourceMissing(f"missing source for unix: `man`/`col` not found. Install with: {APT} bsdextrautils")
    base = Path("/usr/share/man")
    files = [p for s in MAN_SECTIONS for p in (base / s).glob("*.gz")
             if p.is_file() and not p.is_symlink() and p.stat().st_size > 1500
             and not p.name.startswith("gcloud")]  # ~16k generated Cloud SDK pages would swamp the rest
    return split_by_file("unix", files, render_man, rng)


# ---------------------------------------------------------------- generated domains

NAMES = ["Ana", "Ben", "Chloe", "David", "Emma", "Farid", "Grace", "Hugo", "Ines", "Jonas", "Kai",
         "Lena", "Mateo", "Nora", "Omar", "Priya", "Quinn", "Rosa", "Sam", "Tariq", "Uma", "Victor",
         "Wen", "Yara", "Zoe"]
ITEMS = ["apples", "pencils", "notebooks", "oranges", "stickers", "marbles", "cookies", "books",
         "tickets", "bottles", "candles", "eggs", "cards", "plates", "shirts"]


def math_problem(r: random.Random) -> tuple[str, str, int]:
    """One arithmetic word problem: (question, worked solution, exact integer answer)."""
    n1, n2 = r.sample(NAMES, 2)
    it = r.choice(ITEMS)
    k = r.randrange(8)
    if k == 0:
        a, p, b, q = r.randint(2, 20), r.randint(2, 15), r.randint(2, 20), r.randint(2, 15)
        it2 = r.choice([i for i in ITEMS if i != it])
        q_ = f"{n1} buys {a} {it} at {p} dollars each and {b} {it2} at {q} dollars each. How much does {n1} spend in total?"
        s = f"The {it} cost {a} * {p} = {a*p} dollars. The {it2} cost {b} * {q} = {b*q} dollars. In total {a*p} + {b*q} = {a*p+b*q} dollars."
        return q_, s, a * p + b * q
    if k == 1:
        per, n = r.randint(2, 12), r.randint(2, 12)
        tot = per * n
        q_ = f"{n1} has {tot} {it} and shares them equally among {n} friends. How many {it} does each friend get?"
        s = f"Each friend gets {tot} / {n} = {per} {it}."
        return q_, s, per
    if k == 2:
        v, t = r.randint(20, 120), r.randint(2, 9)
        q_ = f"A train travels at {v} km per hour for {t} hours. How far does it travel?"
        s = f"Distance is speed times time: {v} * {t} = {v*t} km."
        return q_, s, v * t
    if k == 3:
        a, b, c = r.randint(20, 200), r.randint(1, 19), r.randint(1, 19)
        q_ = f"{n1} had {a} {it}. {n1} gave {b} to {n2} and then bought {c} more. How many {it} does {n1} have now?"
        s = f"After giving away {b}: {a} - {b} = {a-b}. After buying {c} more: {a-b} + {c} = {a-b+c}."
        return q_, s, a - b + c
    if k == 4:
        price, pct = r.randint(2, 40) * 10, r.choice([10, 20, 25, 30, 50])
        off = price * pct // 100
        q_ = f"A jacket costs {price} dollars. It is on sale for {pct}% off. What is the sale price?"
        s = f"The discount is {pct}% of {price} = {price} * {pct} / 100 = {off} dollars. The sale price is {price} - {off} = {price-off} dollars."
        return q_, s, price - off
    if k == 5:
        w, h = r.randint(2, 30), r.randint(2, 30)
        q_ = f"A rectangular garden is {w} meters long and {h} meters wide. What is its perimeter?"
        s = f"The perimeter is 2 * ({w} + {h}) = 2 * {w+h} = {2*(w+h)} meters."
        return q_, s, 2 * (w + h)
    if k == 6:
        a, d = r.randint(5, 40), r.randint(2, 9)
        q_ = f"{n1} is {a} years old. {n2} is {d} times as old as {n1} minus {a // 2 if a > 10 else 1} years. How old is {n2}?"
        m = a // 2 if a > 10 else 1
        s = f"{d} times {a} is {d*a}. Minus {m} gives {d*a} - {m} = {d*a-m}."
        return q_, s, d * a - m
    boxes, per, left = r.randint(2, 15), r.randint(3, 24), r.randint(0, 9)
    q_ = f"A shop packs {it} in boxes of {per}. It fills {boxes} boxes and has {left} {it} left over. How many {it} were there?"
    s = f"Full boxes hold {boxes} * {per} = {boxes*per}. Adding the {left} left over: {boxes*per} + {left} = {boxes*per+left}."
    return q_, s, boxes * per + left


def fmt_math(q: str, s: str, a: int) -> str:
    return f"Question: {q}\nSolution: {s}\nAnswer: {a}"


TABLES = {
    "employees": ["id", "name", "department", "salary", "hire_year"],
    "orders": ["id", "customer_id", "product", "quantity", "price"],
    "customers": ["id", "name", "city", "country", "signup_year"],
    "books": ["id", "title", "author", "year", "pages"],
    "students": ["id", "name", "grade", "score", "school"],
    "flights": ["id", "origin", "destination", "distance", "airline"],
    "products": ["id", "name", "category", "price", "stock"],
    "sensors": ["id", "location", "kind", "reading", "day"],
}
NUMERIC = {"salary", "hire_year", "quantity", "price", "signup_year", "year", "pages", "score",
           "grade", "distance", "stock", "reading", "day", "customer_id"}
TEXT_VALUES = {"department": ["sales", "research", "support"], "product": ["lamp", "desk", "chair"],
               "city": ["Lyon", "Osaka", "Lima"], "country": ["Peru", "Japan", "France"],
               "author": ["Woolf", "Borges", "Calvino"], "school": ["North", "Central"],
               "origin": ["BER", "MAD", "NRT"], "destination": ["JFK", "LIS", "CDG"],
               "airline": ["Iberia", "Lufthansa"], "category": ["garden", "kitchen", "toys"],
               "location": ["roof", "basement", "hall"], "kind": ["temperature", "humidity"]}


def sql_item(r: random.Random) -> tuple[str, str]:
    """(schema + question, SQL query) over a generated table; columns renamed per seed."""
    t = r.choice(list(TABLES))
    cols = TABLES[t]
    decl = ", ".join(f"{c} {'INTEGER' if c in NUMERIC or c == 'id' else 'TEXT'}" for c in cols)
    schema = f"CREATE TABLE {t} ({decl});"
    num = [c for c in cols if c in NUMERIC]
    txt = [c for c in cols if c in TEXT_VALUES]
    k = r.randrange(6)
    nc = r.choice(num)
    v = r.randint(1, 500)
    if k == 0:
        c2 = r.choice([c for c in cols if c != "id"])
        q = f"List the {c2} of every row in {t} where {nc} is greater than {v}."
        sql = f"SELECT {c2} FROM {t} WHERE {nc} > {v};"
    elif k == 1:
        q = f"How many rows of {t} have {nc} below {v}?"
        sql = f"SELECT COUNT(*) FROM {t} WHERE {nc} < {v};"
    elif k == 2 and txt:
        g = r.choice(txt)
        agg = r.choice(["AVG", "SUM", "MAX", "MIN"])
        word = {"AVG": "average", "SUM": "total", "MAX": "largest", "MIN": "smallest"}[agg]
        q = f"For each {g} in {t}, what is the {word} {nc}?"
        sql = f"SELECT {g}, {agg}({nc}) FROM {t} GROUP BY {g};"
    elif k == 3 and txt:
        g = r.choice(txt)
        val = r.choice(TEXT_VALUES[g])
        q = f"Show all columns of {t} whose {g} is '{val}', ordered by {nc} descending."
        sql = f"SELECT * FROM {t} WHERE {g} = '{val}' ORDER BY {nc} DESC;"
    elif k == 4:
        n = r.randint(1, 10)
        c2 = r.choice([c for c in cols if c != nc])
        q = f"Which {n} rows of {t} have the highest {nc}? Return {c2} and {nc}."
        sql = f"SELECT {c2}, {nc} FROM {t} ORDER BY {nc} DESC LIMIT {n};"
    else:
        lo, hi = sorted(r.sample(range(1, 1000), 2))
        q = f"Find the id of rows in {t} with {nc} between {lo} and {hi}."
        sql = f"SELECT id FROM {t} WHERE {nc} BETWEEN {lo} AND {hi};"
    return f"{schema}\n-- Question: {q}", sql


def table_rows(table: str, r: random.Random, n: int) -> list[tuple]:
    """`n` seeded rows of a generated table: ids 1..n, numbers 1-999, text columns from their value lists."""
    def value(col: str, i: int):
        if col == "id":
            return i
        if col in NUMERIC:
            return r.randint(1, 999)
        if col in TEXT_VALUES:
            return r.choice(TEXT_VALUES[col])
        return f"{r.choice(NAMES)} {r.choice(ITEMS)}" if col == "title" else r.choice(NAMES)
    return [tuple(value(c, i) for c in TABLES[table]) for i in range(1, n + 1)]


def sql_script(seed: int, rows: int = 60) -> str:
    """CREATE TABLE and INSERT statements for every generated table: the database the SQL tasks run on."""
    r = random.Random(seed * 1000 + 9)
    out = []
    for t, cols in TABLES.items():
        decl = ", ".join(f"{c} {'INTEGER' if c in NUMERIC or c == 'id' else 'TEXT'}" for c in cols)
        out.append(f"CREATE TABLE {t} ({decl});")
        for row in table_rows(t, r, rows):
            values = ", ".join(str(v) if isinstance(v, int) else "'" + v + "'" for v in row)
            out.append(f"INSERT INTO {t} VALUES ({values});")
    return "\n".join(out) + "\n"


def write_tasks(root: Path, seed: int, n: int = 60) -> None:
    """patterns/eval/tasks: the first `n` items of the math and sql eval streams, as checkable tasks.

    The prompts are the demos' prompt form (what users of a chat endpoint send); the eval stream is
    held out from training like the eval passages."""
    tasks = root / "patterns" / "eval" / "tasks"
    r = random.Random(seed * 1000 + 2)
    write_jsonl(tasks / "math.jsonl", [{"prompt": f"Question: {q}", "answer": str(a)}
                                       for q, _, a in (math_problem(r) for _ in range(n))])
    r = random.Random((seed + 7) * 1000 + 2)
    write_jsonl(tasks / "sql.jsonl", [{"prompt": p, "query": q, "database": "sql.sql"}
                                      for p, q in (sql_item(r) for _ in range(n))])
    (tasks / "sql.sql").write_text(sql_script(seed + 7), encoding="utf-8")


def fmt_sql(p: str, s: str) -> str:
    return f"{p}\n{s}"


def generated_split(name: str, gen, fmt, seed: int) -> Split:
    """Train, eval and demos come from three separate seed streams (the 'source' of a generator)."""
    def items(stream: int, n: int):
        r = random.Random(seed * 1000 + stream)
        return [gen(r) for _ in range(n)]
    train = pack_items([fmt(*x) for x in items(1, 25000 if name == "math" else 32000)])
    ev = pack_items([fmt(*x) for x in items(2, 3000)])[:EVAL_PASSAGES]
    demo_items = items(3, N_DEMOS)
    if name == "math":
        demos = [{"prompt": f"Question: {q}", "response": f"Solution: {s}\nAnswer: {a}"} for q, s, a in demo_items]
    else:
        demos = [{"prompt": p, "response": s} for p, s in demo_items]
    return Split(train=train, eval=ev, demos=demos)


AMINO = "ACDEFGHIKLMNPQRSTVWY"
ORGANISMS = ["Escherichia coli", "Homo sapiens", "Mus musculus", "Saccharomyces cerevisiae",
             "Arabidopsis thaliana", "Danio rerio", "Bacillus subtilis"]


def fasta_record(r: random.Random, i: int) -> str:
    """A FASTA record (protein or DNA) with a seeded residue sequence, 60 columns per line."""
    if r.random() < 0.5:
        seq = "M" + "".join(r.choices(AMINO, k=r.randint(150, 500)))
        head = f">sp|Q{r.randint(10000, 99999)}|PRT{i:05d} hypothetical protein OS={r.choice(ORGANISMS)} OX={r.randint(1000, 99999)}"
    else:
        seq = "".join(r.choices("ACGT", weights=[3, 2, 2, 3], k=r.randint(300, 900)))
        head = f">chr{r.randint(1, 22)}:{r.randint(10**5, 10**8)}-{r.randint(10**5, 10**8)} {r.choice(ORGANISMS)} genomic region"
    return head + "\n" + "\n".join(seq[j:j + 60] for j in range(0, len(seq), 60))


def build_ood(seed: int) -> list[str]:
    r = random.Random(seed * 1000 + 99)
    return [fasta_record(r, i)[:MAX_CHARS] for i in range(EVAL_PASSAGES)]


# ---------------------------------------------------------------- writing

def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in rows), encoding="utf-8")
    tmp.rename(path)


def write_jsonl_gz(path: Path, rows: list[dict]) -> None:
    """Deterministic gzip (mtime 0, no file name) so rebuilds give identical bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=9) as g:
        g.write("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in rows).encode("utf-8"))
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(buf.getvalue())
    tmp.rename(path)


BUILDERS = {"python": build_python, "c": build_c, "english": build_english, "german": build_german,
            "spanish": build_spanish, "unix": build_unix}


def build_domain(name: str, seed: int) -> Split:
    rng = random.Random(f"{seed}:{name}")
    if name == "math":
        return generated_split("math", math_problem, fmt_math, seed)
    if name == "sql":
        return generated_split("sql", sql_item, fmt_sql, seed + 7)
    return BUILDERS[name](rng)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("/work/scratch/corpus"))
    ap.add_argument("--ship", type=Path, default=None, help="repo root: write patterns/ there")
    ap.add_argument("--tasks", type=Path, default=None, help="repo root: write only patterns/eval/tasks/ there")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--domains", nargs="*", default=DOMAINS)
    args = ap.parse_args()
    if args.tasks:
        write_tasks(args.tasks, args.seed)
        return
    try:
        stats = {}
        for name in tqdm(args.domains, desc="domains"):
            sp = build_domain(name, args.seed)
            write_jsonl(args.out / name / "train.jsonl", [{"text": t} for t in sp.train])
            write_jsonl(args.out / name / "eval.jsonl", [{"text": t} for t in sp.eval])
            write_jsonl(args.out / name / "demos.jsonl", sp.demos)
            stats[name] = {"train_passages": len(sp.train), "train_chars": sum(map(len, sp.train)),
                           "eval_passages": len(sp.eval), "demos": len(sp.demos)}
            if args.ship:
                write_jsonl(args.ship / "patterns" / f"{name}.jsonl", sp.demos)
                write_jsonl_gz(args.ship / "patterns" / "eval" / f"{name}.jsonl.gz", [{"text": t} for t in sp.eval])
        ood = build_ood(args.seed)
        write_jsonl(args.out / "ood" / "eval.jsonl", [{"text": t} for t in ood])
        if args.ship:
            write_jsonl_gz(args.ship / "patterns" / "eval" / "ood.jsonl.gz", [{"text": t} for t in ood])
        stats["ood"] = {"eval_passages": len(ood)}
        (args.out / "stats.json").write_text(json.dumps(stats, indent=1))
        print(json.dumps(stats, indent=1))
    except SourceMissing as e:
        print(f"build_corpus: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
