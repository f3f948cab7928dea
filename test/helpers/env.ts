/** fn() with the environment variable `name` set to `value` (unchanged when undefined), restored after. */
export function withEnv<T>(name: string, value: string | undefined, fn: () => T): T {
  if (value === undefined) return fn();
  const saved = process.env[name];
  process.env[name] = value;
  try {
    return fn();
  } finally {
    if (saved === undefined) delete process.env[name];
    else process.env[name] = saved;
  }
}
