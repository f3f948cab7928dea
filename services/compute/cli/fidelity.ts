export async function run(argv: string[]): Promise<number> {
  process.stderr.write("freekv fidelity: not built yet\n");
  return 2;
}
