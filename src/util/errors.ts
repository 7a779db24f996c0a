/**
 * An error meant for a person: one line naming the object and what to do.
 * The CLI prints its message (no stack) and exits with `exitCode`.
 */
export class UserError extends Error {
  constructor(
    message: string,
    readonly exitCode = 2,
    /** What to do, when the message alone does not say it (the API's "hint"). */
    readonly hint?: string,
  ) {
    super(message);
    this.name = 'UserError';
  }
}

/** A user error naming an object that does not exist (the API's 404; exit 2 like any unknown name). */
export class NotFoundError extends UserError {
  constructor(message: string, hint?: string) {
    super(message, 2, hint);
    this.name = 'NotFoundError';
  }
}

/** The errno-style code of a Node error, if any. */
export function errnoCode(err: unknown): string | undefined {
  return typeof err === 'object' && err !== null && 'code' in err && typeof (err as { code: unknown }).code === 'string'
    ? (err as { code: string }).code
    : undefined;
}
