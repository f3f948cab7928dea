export async function run(argv: string[]): Promise<number> {
  process.stderr.write("freekv trace: not built yet\n");
  return 2;
}
