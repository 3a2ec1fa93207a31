// The restricted unpickler for torch.save's data.pkl (TorchCheckpoint.swift has the format and the rules).

/// A storage as a tensor's persistent id names it.
struct TorchStorageRef {
    let dtype: DType
    let key: String
    let elementCount: Int
}

struct TorchTensorRef {
    let storage: TorchStorageRef
    let offset: Int
    let shape: [Int]
    let strides: [Int]
}

/// The callables and classes a torch state dict refers to — the whole allow-list.
enum PickleGlobal: String, CaseIterable {
    case orderedDict = "collections.OrderedDict"
    case rebuildTensor = "torch._utils._rebuild_tensor_v2"
    case rebuildParameter = "torch._utils._rebuild_parameter"
    case floatStorage = "torch.FloatStorage"
    case halfStorage = "torch.HalfStorage"
    case bfloat16Storage = "torch.BFloat16Storage"
    case longStorage = "torch.LongStorage"
    case intStorage = "torch.IntStorage"

    var storageDType: DType? {
        switch self {
        case .floatStorage: return .f32
        case .halfStorage: return .f16
        case .bfloat16Storage: return .bf16
        case .longStorage: return .i64
        case .intStorage: return .i32
        default: return nil
        }
    }

    /// Storage classes torch has that Pea recognises only to say why it cannot read them.
    static let otherStorages: Set<String> = [
        "torch.DoubleStorage", "torch.ByteStorage", "torch.CharStorage", "torch.ShortStorage", "torch.BoolStorage",
        "torch.ComplexFloatStorage", "torch.ComplexDoubleStorage", "torch.QInt8Storage", "torch.QUInt8Storage",
        "torch.QInt32Storage", "torch.QUInt4x2Storage", "torch.QUInt2x4Storage", "torch.UntypedStorage",
        "torch.storage.UntypedStorage", "torch.Float8_e4m3fnStorage", "torch.Float8_e5m2Storage",
    ]
}

/// A tuple, list or dict built by the pickle. A reference type, because the pickle fills a container after
/// creating (and memoising) it; `frozen` once it has been put inside another container or used as an argument.
final class PickleContainer {
    enum Kind { case tuple, list, dict }
    let kind: Kind
    var items: [PickleValue] = []            // tuple and list elements; dict values
    var keys: [PickleValue] = []             // dict keys, in insertion order
    var depth = 1
    var frozen = false

    init(_ kind: Kind, items: [PickleValue] = []) {
        self.kind = kind
        self.items = items
    }
}

enum PickleValue {
    case none
    case bool(Bool)
    case int(Int)
    case float(Double)
    case string(String)
    case global(PickleGlobal)
    case container(PickleContainer)
    case storage(TorchStorageRef)
    case tensor(TorchTensorRef)

    var depth: Int {
        if case .container(let c) = self { return c.depth }
        return 0
    }

    /// What the value is, for messages ("a list", "an int", …).
    var kindDescription: String {
        switch self {
        case .none: return "None"
        case .bool: return "a bool"
        case .int: return "an int"
        case .float: return "a float"
        case .string: return "a string"
        case .global(let g): return "the callable \(g.rawValue)"
        case .container(let c):
            switch c.kind {
            case .tuple: return "a tuple"
            case .list: return "a list"
            case .dict: return "a dict"
            }
        case .storage: return "a storage"
        case .tensor: return "a tensor"
        }
    }
}

enum TorchUnpickler {
    /// The deepest nesting of containers accepted (a state dict's `_metadata` is 3 deep).
    static let maximumDepth = 32

    /// Runs the pickle program in `data` and returns the object it builds. Never executes code: the only
    /// "calls" are the allow-listed constructors, interpreted here.
    static func run(_ data: [UInt8], context: String, fail baseFail: @escaping (String) -> PEAError) throws -> PickleValue {
        var position = 0
        var opcodeStart = 0
        func fail(_ reason: String) -> PEAError {
            baseFail("\(context): \(reason) (at pickle byte \(opcodeStart)); nothing from the file was executed")
        }
        func take(_ count: Int) throws -> ArraySlice<UInt8> {
            guard count >= 0, count <= data.count - position else { throw fail("the pickle ends in the middle of an opcode's argument") }
            defer { position += count }
            return data[position..<(position + count)]
        }
        func byte() throws -> UInt8 { try take(1).first! }
        func littleEndian(_ count: Int) throws -> UInt64 {
            var value: UInt64 = 0
            for (i, b) in try take(count).enumerated() { value |= UInt64(b) << (8 * UInt64(i)) }
            return value
        }
        func line() throws -> String {
            guard let end = data[position...].firstIndex(of: 0x0A) else { throw fail("the pickle ends inside a GLOBAL name") }
            defer { position = end + 1 }
            return String(decoding: data[position..<end], as: UTF8.self)
        }
        func text(_ count: Int) throws -> String {
            let bytes = try take(count)
            guard let string = String(validating: bytes, as: UTF8.self) else { throw fail("a string is not valid UTF-8") }
            return string
        }

        var stack: [PickleValue] = []
        var marks: [Int] = []
        var memo: [Int: PickleValue] = [:]
        func base() -> Int { marks.last ?? 0 }
        func pop() throws -> PickleValue {
            guard stack.count > base() else { throw fail("stack underflow") }
            return stack.removeLast()
        }
        func top() throws -> PickleValue {
            guard stack.count > base(), let value = stack.last else { throw fail("stack underflow") }
            return value
        }
        func popMark() throws -> [PickleValue] {
            guard let mark = marks.popLast() else { throw fail("no MARK to pop to") }
            defer { stack.removeSubrange(mark...) }
            return Array(stack[mark...])
        }
        /// Marks values as being put inside something; containers can no longer change after that.
        func freeze(_ values: [PickleValue]) { for case .container(let c) in values { c.frozen = true } }
        func container(_ kind: PickleContainer.Kind, _ items: [PickleValue]) throws -> PickleValue {
            freeze(items)
            let box = PickleContainer(kind, items: items)
            box.depth = 1 + (items.map(\.depth).max() ?? 0)
            guard box.depth <= maximumDepth else { throw fail("objects nested more than \(maximumDepth) deep") }
            return .container(box)
        }
        func mutable(_ value: PickleValue, _ kind: PickleContainer.Kind, _ opcode: String) throws -> PickleContainer {
            guard case .container(let box) = value, box.kind == kind else {
                throw fail("\(opcode) on \(value.kindDescription) is not allowed")
            }
            guard !box.frozen else { throw fail("\(opcode) on a container already inside another object is not allowed") }
            return box
        }
        /// Puts `values` into the container `target` (SETITEM(S), APPEND(S)). The values are frozen first, so a
        /// container cannot be put inside itself.
        func insert(_ values: [PickleValue], into target: PickleValue, _ kind: PickleContainer.Kind, _ opcode: String, asPairs: Bool) throws {
            freeze(values)
            let box = try mutable(target, kind, opcode)
            let newDepth = 1 + (values.map(\.depth).max() ?? 0)
            guard newDepth <= maximumDepth else { throw fail("objects nested more than \(maximumDepth) deep") }
            box.depth = max(box.depth, newDepth)
            if !asPairs { box.items += values; return }
            guard values.count % 2 == 0 else { throw fail("SETITEMS with an odd number of items") }
            for i in stride(from: 0, to: values.count, by: 2) {
                let (key, value) = (values[i], values[i + 1])
                if case .string(let name) = key,
                   let existing = box.keys.firstIndex(where: { if case .string(name) = $0 { return true }; return false }) {
                    box.items[existing] = value
                } else {
                    box.keys.append(key)
                    box.items.append(value)
                }
            }
        }
        func global(_ module: String, _ name: String, opcode: String) throws -> PickleValue {
            let qualified = "\(module).\(name)"
            if let allowed = PickleGlobal(rawValue: qualified) { return .global(allowed) }
            if PickleGlobal.otherStorages.contains(qualified) {
                throw fail("tensor storage type \(qualified) is not supported (Pea reads float32, float16, bfloat16, int64 and int32 tensors)")
            }
            throw fail("\(opcode) '\(module) \(name)' is not allowed: Pea's unpickler accepts only tensor state dicts (\(PickleGlobal.allCases.map(\.rawValue).joined(separator: ", ")))")
        }

        while true {
            opcodeStart = position
            let opcode = try byte()
            switch opcode {
            case 0x80:  // PROTO
                let version = try byte()
                guard version >= 2 && version <= 5 else { throw fail("pickle protocol \(version) is not supported (torch.save writes protocol 2)") }
            case 0x95:  // FRAME: a length hint only
                _ = try take(8)
            case 0x2E:  // STOP
                let result = try pop()
                return result
            case 0x28:  // MARK
                marks.append(stack.count)
            case 0x7D:  // EMPTY_DICT
                stack.append(.container(PickleContainer(.dict)))
            case 0x5D:  // EMPTY_LIST
                stack.append(.container(PickleContainer(.list)))
            case 0x29:  // EMPTY_TUPLE
                stack.append(try container(.tuple, []))
            case 0x74:  // TUPLE
                stack.append(try container(.tuple, try popMark()))
            case 0x85:  // TUPLE1
                let a = try pop()
                stack.append(try container(.tuple, [a]))
            case 0x86:  // TUPLE2
                let b = try pop(), a = try pop()
                stack.append(try container(.tuple, [a, b]))
            case 0x87:  // TUPLE3
                let c = try pop(), b = try pop(), a = try pop()
                stack.append(try container(.tuple, [a, b, c]))
            case 0x4E:  // NONE
                stack.append(.none)
            case 0x88:  // NEWTRUE
                stack.append(.bool(true))
            case 0x89:  // NEWFALSE
                stack.append(.bool(false))
            case 0x4A:  // BININT: 4-byte signed
                stack.append(.int(Int(Int32(bitPattern: UInt32(try littleEndian(4))))))
            case 0x4B:  // BININT1
                stack.append(.int(Int(try byte())))
            case 0x4D:  // BININT2
                stack.append(.int(Int(try littleEndian(2))))
            case 0x8A:  // LONG1: n-byte two's complement
                let count = Int(try byte())
                guard count <= 8 else { throw fail("LONG1 integer of \(count) bytes is too large") }
                var value = try littleEndian(count)
                if count > 0 && count < 8 && value & (UInt64(1) << UInt64(8 * count - 1)) != 0 {
                    value |= ~UInt64(0) << UInt64(8 * count)  // sign-extend
                }
                stack.append(.int(Int(Int64(bitPattern: value))))
            case 0x47:  // BINFLOAT: 8-byte big-endian double
                let raw = try take(8).reduce(UInt64(0)) { $0 << 8 | UInt64($1) }
                stack.append(.float(Double(bitPattern: raw)))
            case 0x58:  // BINUNICODE
                stack.append(.string(try text(Int(try littleEndian(4)))))
            case 0x8C:  // SHORT_BINUNICODE
                stack.append(.string(try text(Int(try byte()))))
            case 0x8D:  // BINUNICODE8
                let length = try littleEndian(8)
                guard length <= UInt64(data.count) else { throw fail("the pickle ends in the middle of an opcode's argument") }
                stack.append(.string(try text(Int(length))))
            case 0x63:  // GLOBAL "module\nname\n"
                let module = try line(), name = try line()
                stack.append(try global(module, name, opcode: "GLOBAL"))
            case 0x93:  // STACK_GLOBAL
                let nameValue = try pop(), moduleValue = try pop()
                guard case .string(let module) = moduleValue, case .string(let name) = nameValue else {
                    throw fail("STACK_GLOBAL needs two strings")
                }
                stack.append(try global(module, name, opcode: "STACK_GLOBAL"))
            case 0x71:  // BINPUT
                memo[Int(try byte())] = try top()
            case 0x72:  // LONG_BINPUT
                memo[Int(try littleEndian(4))] = try top()
            case 0x94:  // MEMOIZE
                memo[memo.count] = try top()
            case 0x68, 0x6A:  // BINGET, LONG_BINGET
                let index = Int(opcode == 0x68 ? UInt64(try byte()) : try littleEndian(4))
                guard let value = memo[index] else { throw fail("memo entry \(index) was never stored") }
                stack.append(value)
            case 0x73:  // SETITEM
                let value = try pop(), key = try pop()
                try insert([key, value], into: try top(), .dict, "SETITEM", asPairs: true)
            case 0x75:  // SETITEMS
                let items = try popMark()
                try insert(items, into: try top(), .dict, "SETITEMS", asPairs: true)
            case 0x61:  // APPEND
                let value = try pop()
                try insert([value], into: try top(), .list, "APPEND", asPairs: false)
            case 0x65:  // APPENDS
                let items = try popMark()
                try insert(items, into: try top(), .list, "APPENDS", asPairs: false)
            case 0x51:  // BINPERSID
                stack.append(try persistentLoad(try pop(), fail: fail))
            case 0x52:  // REDUCE
                let arguments = try pop(), callable = try pop()
                freeze([arguments])
                stack.append(try reduce(callable, arguments, fail: fail))
            case 0x81:  // NEWOBJ: cls.__new__(cls, *args); only an empty OrderedDict
                let arguments = try pop(), cls = try pop()
                guard case .global(.orderedDict) = cls, case .container(let args) = arguments, args.items.isEmpty else {
                    throw fail("NEWOBJ of \(cls.kindDescription) is not allowed (only collections.OrderedDict)")
                }
                stack.append(.container(PickleContainer(.dict)))
            case 0x62:  // BUILD: obj.__setstate__(state) or obj.__dict__.update(state); only a dict's attributes
                let state = try pop()
                let object = try top()
                _ = try mutable(object, .dict, "BUILD (setting object state)")
                guard case .container(let box) = state, box.kind == .dict else {
                    throw fail("BUILD with \(state.kindDescription) as the state is not allowed (only the attribute dict of an OrderedDict)")
                }
                freeze([state])  // an OrderedDict's `_metadata`: kept out of the state dict, ignored
            case 0x69:  // INST "module\nname\n": instantiates a class — name it in the refusal
                let module = try line(), name = try line()
                throw fail("pickle opcode INST '\(module) \(name)' is not allowed: Pea's unpickler accepts only tensor state dicts")
            default:
                throw fail("pickle opcode \(describe(opcode)) is not allowed: Pea's unpickler accepts only the opcodes of torch state dicts")
            }
        }
    }

    /// `('storage', torch.FloatStorage, key, location, element count)`.
    private static func persistentLoad(_ pid: PickleValue, fail: (String) -> PEAError) throws -> PickleValue {
        guard case .container(let tuple) = pid, tuple.kind == .tuple, tuple.items.count == 5,
              case .string("storage") = tuple.items[0] else {
            throw fail("a persistent id must be ('storage', type, key, location, size), found \(pid.kindDescription)")
        }
        guard case .global(let type) = tuple.items[1], let dtype = type.storageDType else {
            throw fail("a persistent id names \(tuple.items[1].kindDescription) as its storage type")
        }
        guard case .string(let key) = tuple.items[2], case .string = tuple.items[3],
              case .int(let count) = tuple.items[4], count >= 0 else {
            throw fail("a persistent id must be ('storage', type, key: str, location: str, size: int ≥ 0)")
        }
        return .storage(TorchStorageRef(dtype: dtype, key: key, elementCount: count))
    }

    private static func reduce(_ callable: PickleValue, _ arguments: PickleValue, fail: (String) -> PEAError) throws -> PickleValue {
        guard case .global(let function) = callable else {
            throw fail("REDUCE calls \(callable.kindDescription), which is not an allowed callable")
        }
        guard case .container(let argumentTuple) = arguments, argumentTuple.kind == .tuple else {
            throw fail("REDUCE of \(function.rawValue) with \(arguments.kindDescription) as its arguments")
        }
        let args = argumentTuple.items
        switch function {
        case .orderedDict:
            guard args.isEmpty else { throw fail("collections.OrderedDict with arguments is not allowed") }
            return .container(PickleContainer(.dict))
        case .rebuildTensor:
            // (storage, storage_offset, size, stride, requires_grad, backward_hooks[, metadata])
            guard args.count == 6 || args.count == 7 else {
                throw fail("torch._utils._rebuild_tensor_v2 takes 6 or 7 arguments, found \(args.count)")
            }
            guard case .storage(let storage) = args[0] else {
                throw fail("torch._utils._rebuild_tensor_v2: the first argument is \(args[0].kindDescription), not a storage")
            }
            guard case .int(let offset) = args[1], offset >= 0 else {
                throw fail("torch._utils._rebuild_tensor_v2: the storage offset must be an int ≥ 0")
            }
            let shape = try integers(args[2], "size", fail: fail), strides = try integers(args[3], "stride", fail: fail)
            guard shape.count == strides.count else {
                throw fail("torch._utils._rebuild_tensor_v2: size \(shape) and stride \(strides) differ in rank")
            }
            guard case .bool = args[4] else { throw fail("torch._utils._rebuild_tensor_v2: requires_grad must be a bool") }
            guard case .container(let hooks) = args[5], hooks.kind == .dict, hooks.items.isEmpty else {
                throw fail("torch._utils._rebuild_tensor_v2: backward hooks must be an empty OrderedDict")
            }
            if args.count == 7 {
                guard case .container(let metadata) = args[6], metadata.kind == .dict else {
                    throw fail("torch._utils._rebuild_tensor_v2: metadata must be a dict")
                }
            }
            // Every element the view reaches must lie inside the storage.
            var count = 1, last = offset, overflow = false
            for (size, step) in zip(shape, strides) {
                let (c, o1) = count.multipliedReportingOverflow(by: size)
                let (span, o2) = max(size - 1, 0).multipliedReportingOverflow(by: step)
                let (l, o3) = last.addingReportingOverflow(span)
                count = c; last = l
                overflow = overflow || o1 || o2 || o3
            }
            guard !overflow else { throw fail("torch._utils._rebuild_tensor_v2: size \(shape) with stride \(strides) overflows") }
            // A view may repeat its storage (stride 0, `expand`), but not without bound.
            let repeatLimit = try CheckedSize.sum(CheckedSize.product(64, storage.elementCount, "the repeat limit of storage '\(storage.key)'", fail: fail),
                                                  4096, "the repeat limit of storage '\(storage.key)'", fail: fail)
            guard count <= repeatLimit else {
                throw fail("torch._utils._rebuild_tensor_v2: a tensor of size \(shape) repeats its storage '\(storage.key)' of \(storage.elementCount) elements more than 64 times")
            }
            guard count == 0 ? offset <= storage.elementCount : last < storage.elementCount else {
                throw fail("torch._utils._rebuild_tensor_v2: a tensor of size \(shape), stride \(strides) at offset \(offset) reaches past its storage '\(storage.key)' of \(storage.elementCount) elements")
            }
            return .tensor(TorchTensorRef(storage: storage, offset: offset, shape: shape, strides: strides))
        case .rebuildParameter:
            // (data, requires_grad, backward_hooks)
            guard args.count == 3, case .tensor = args[0], case .bool = args[1],
                  case .container(let hooks) = args[2], hooks.kind == .dict, hooks.items.isEmpty else {
                throw fail("torch._utils._rebuild_parameter takes (tensor, requires_grad, empty hooks)")
            }
            return args[0]
        default:
            throw fail("calling \(function.rawValue) is not allowed (storage types appear only inside persistent ids)")
        }
    }

    private static func integers(_ value: PickleValue, _ what: String, fail: (String) -> PEAError) throws -> [Int] {
        guard case .container(let tuple) = value, tuple.kind == .tuple else {
            throw fail("torch._utils._rebuild_tensor_v2: \(what) must be a tuple of ints, found \(value.kindDescription)")
        }
        return try tuple.items.map {
            guard case .int(let n) = $0, n >= 0 else {
                throw fail("torch._utils._rebuild_tensor_v2: \(what) must be a tuple of ints ≥ 0")
            }
            return n
        }
    }

    /// The tensors of the unpickled object: a dict of tensors, or a checkpoint dict's "state_dict" entry.
    static func stateDict(from root: PickleValue, fail: (String) -> PEAError) throws -> [(String, TorchTensorRef)] {
        guard case .container(let dict) = root, dict.kind == .dict else {
            throw fail("the file holds \(root.kindDescription), not a state dict (a dict of tensors)")
        }
        var entries = dict
        if let index = dict.keys.firstIndex(where: { if case .string("state_dict") = $0 { return true }; return false }),
           case .container(let inner) = dict.items[index], inner.kind == .dict {
            entries = inner
        }
        var tensors: [(String, TorchTensorRef)] = []
        for (key, value) in zip(entries.keys, entries.items) {
            guard case .string(let name) = key else {
                throw fail("the state dict has \(key.kindDescription) as a key; tensor names must be strings")
            }
            guard case .tensor(let tensor) = value else {
                throw fail("entry '\(name)' of the state dict is \(value.kindDescription), not a tensor")
            }
            tensors.append((name, tensor))
        }
        return tensors
    }

    /// An opcode byte with its pickle name, for messages.
    static func describe(_ opcode: UInt8) -> String {
        let names: [UInt8: String] = [
            0x69: "INST", 0x6F: "OBJ", 0x92: "NEWOBJ_EX", 0x50: "PERSID", 0x82: "EXT1", 0x83: "EXT2", 0x84: "EXT4",
            0x49: "INT", 0x4C: "LONG", 0x46: "FLOAT", 0x53: "STRING", 0x54: "BINSTRING", 0x55: "SHORT_BINSTRING",
            0x56: "UNICODE", 0x70: "PUT", 0x67: "GET", 0x6C: "LIST", 0x64: "DICT", 0x30: "POP", 0x31: "POP_MARK",
            0x32: "DUP", 0x42: "BINBYTES", 0x43: "SHORT_BINBYTES", 0x8B: "LONG4", 0x8E: "BINBYTES8",
            0x8F: "EMPTY_SET", 0x90: "ADDITEMS", 0x91: "FROZENSET", 0x96: "BYTEARRAY8", 0x97: "NEXT_BUFFER",
            0x98: "READONLY_BUFFER",
        ]
        let hex = "0x" + (opcode < 16 ? "0" : "") + String(opcode, radix: 16)
        return names[opcode].map { "\($0) (\(hex))" } ?? hex
    }
}
