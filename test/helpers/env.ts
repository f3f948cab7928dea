/**
 * fn() with the environment variable `name` set to `value`, or removed when `value` is null
 * (unchanged when undefined), restored after.
 */
export function withEnv<T>(name: string, value: string | null | undefined, fn: () => T): T {
  if (value === undefined) return fn();
  const saved = process.env[name];
  if (value === null) delete process.env[name];
  else process.env[name] = value;
  try {
    return fn();
  } finally {
    if (saved === undefined) delete process.env[name];
    else process.env[name] = saved;
  }
}
