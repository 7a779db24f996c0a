/** [from, to) minus the given [start, end) ranges, as sorted pieces. */
export function subtract(from: number, to: number, holes: Iterable<[number, number]>): [number, number][] {
  let pieces: [number, number][] = [[from, to]];
  for (const [hs, he] of holes) {
    pieces = pieces.flatMap(([s, e]): [number, number][] => {
      if (he <= s || hs >= e) return [[s, e]];
      const out: [number, number][] = [];
      if (hs > s) out.push([s, hs]);
      if (he < e) out.push([he, e]);
      return out;
    });
  }
  return pieces;
}
