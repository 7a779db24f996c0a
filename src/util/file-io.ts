/**
 * Writing a new file, behind one small interface: asynchronous for the
 * daemon (the event loop keeps serving the peer links while a split
 * brain's blocks are saved), synchronous underneath for the deterministic
 * simulation (test/replication/sim), whose fake clock must not race real
 * I/O finishing in libuv's thread pool at a time the seed does not decide.
 */
import fs from 'node:fs';
import fsp from 'node:fs/promises';

export interface NewFile {
  /** Append all of `data` (a short write is continued). */
  write(data: Buffer): Promise<void>;
  sync(): Promise<void>;
  close(): Promise<void>;
}

export interface FileIo {
  mkdir(dir: string): Promise<void>;
  /** Create `file` (it must not exist) with `mode`. */
  create(file: string, mode: number): Promise<NewFile>;
  /** fsync a directory: a new file's entry in it survives a power cut only after this. */
  syncDir(dir: string): Promise<void>;
}

export const asyncFileIo: FileIo = {
  async mkdir(dir) {
    await fsp.mkdir(dir, { recursive: true });
  },
  async create(file, mode) {
    const fh = await fsp.open(file, 'wx', mode);
    return {
      async write(data) {
        for (let at = 0; at < data.length; ) at += (await fh.write(data, at, data.length - at)).bytesWritten;
      },
      sync: () => fh.sync(),
      close: () => fh.close(),
    };
  },
  async syncDir(dir) {
    const fh = await fsp.open(dir, 'r');
    try {
      await fh.sync();
    } finally {
      await fh.close();
    }
  },
};

/** Each call done before it returns (its promise already settled). */
export const syncFileIo: FileIo = {
  mkdir: async (dir) => {
    fs.mkdirSync(dir, { recursive: true });
  },
  create: async (file, mode) => {
    const fd = fs.openSync(file, 'wx', mode);
    return {
      write: async (data) => {
        for (let at = 0; at < data.length; ) at += fs.writeSync(fd, data, at, data.length - at);
      },
      sync: async () => fs.fsyncSync(fd),
      close: async () => fs.closeSync(fd),
    };
  },
  syncDir: async (dir) => {
    const fd = fs.openSync(dir, 'r');
    try {
      fs.fsyncSync(fd);
    } finally {
      fs.closeSync(fd);
    }
  },
};
